"""Audio I/O: reading formats, mixdown, resampling, pad and crop, writing, and clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from vqkit.audio.io import fix_length, read_audio, resample, write_audio
from vqkit.errors import VqkitError


def sine(freq: float, sample_rate: int, seconds: float = 0.5, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(sample_rate * seconds)) / sample_rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(wave: np.ndarray, sample_rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.fft.rfftfreq(len(wave), 1 / sample_rate)[spectrum.argmax()])


@pytest.mark.parametrize("suffix,subtype,tol", [(".wav", "PCM_16", 1e-4), (".flac", None, 1e-4)])
def test_read_lossless_formats(tmp_path: Path, suffix: str, subtype, tol: float) -> None:
    x = sine(440, 16000)
    sf.write(tmp_path / f"a{suffix}", x, 16000, subtype=subtype)
    y, rate = read_audio(tmp_path / f"a{suffix}")
    assert rate == 16000 and y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_allclose(y, x, atol=tol)


def test_read_ogg_vorbis(tmp_path: Path) -> None:
    x = sine(440, 22050)
    sf.write(tmp_path / "a.ogg", x, 22050)
    y, rate = read_audio(tmp_path / "a.ogg")
    assert rate == 22050 and abs(len(y) - len(x)) < 1024
    assert abs(peak_hz(y, rate) - 440) < 5 and np.corrcoef(y[: len(x)], x[: len(y)])[0, 1] > 0.99


def test_stereo_is_mixed_down(tmp_path: Path) -> None:
    left, right = sine(300, 8000), sine(1000, 8000, amp=0.25)
    sf.write(tmp_path / "st.wav", np.stack([left, right], axis=1), 8000, subtype="FLOAT")
    y, _ = read_audio(tmp_path / "st.wav")
    assert y.ndim == 1 and y.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(y, (left + right) / 2, atol=1e-7)


def test_read_resamples_on_request(tmp_path: Path) -> None:
    sf.write(tmp_path / "a.wav", sine(440, 8000, seconds=1.0), 8000, subtype="FLOAT")
    y, rate = read_audio(tmp_path / "a.wav", sample_rate=16000)
    assert rate == 16000 and len(y) == 16000 and y.dtype == np.float32
    assert abs(peak_hz(y, 16000) - 440) < 2
    assert abs(np.abs(y[1000:-1000]).max() - 0.5) < 0.01  # level kept


@pytest.mark.parametrize("orig,target", [(16000, 8000), (22050, 16000), (8000, 44100)])
def test_resample_keeps_frequency_and_scales_length(orig: int, target: int) -> None:
    x = sine(500, orig, seconds=1.0)
    y = resample(x, orig, target)
    assert abs(len(y) - target) <= 1 and y.dtype == np.float32
    assert abs(peak_hz(y, target) - 500) < 2


def test_resample_same_rate_and_bad_rates() -> None:
    x = sine(500, 8000)
    assert np.array_equal(resample(x, 8000, 8000), x)
    with pytest.raises(VqkitError, match="target sample rate 0 Hz"):
        resample(x, 8000, 0)
    with pytest.raises(VqkitError, match="source sample rate"):
        resample(x, 10**7, 8000)


@pytest.mark.parametrize("side", ["right", "left"])
def test_fix_length_crops_the_far_end(side: str) -> None:
    x = np.arange(10, dtype=np.float32)
    y = fix_length(x, 4, side=side)
    assert np.array_equal(y, x[:4] if side == "right" else x[-4:])
    assert np.array_equal(fix_length(x, 10, side=side), x)


@pytest.mark.parametrize("side", ["right", "left"])
def test_fix_length_pads_constant(side: str) -> None:
    x = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    y = fix_length(x, 6, side=side)
    expected = [1, 2, 3, 0, 0, 0] if side == "right" else [0, 0, 0, 1, 2, 3]
    assert np.array_equal(y, np.array(expected, dtype=np.float32)) and y.dtype == np.float32


@pytest.mark.parametrize("side", ["right", "left"])
def test_fix_length_pads_reflect_even_far_beyond_the_input(side: str) -> None:
    x = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    y = fix_length(x, 8, side=side, mode="reflect")
    expected = [1, 2, 3, 2, 1, 2, 3, 2] if side == "right" else [2, 1, 2, 3, 2, 1, 2, 3]
    assert len(y) == 8 and y.dtype == np.float32
    assert np.array_equal(y, np.array(expected, dtype=np.float32))
    kept = y[:3] if side == "right" else y[-3:]
    assert np.array_equal(kept, x)
    long = fix_length(np.array([0.5, -0.5], dtype=np.float32), 101, side=side, mode="reflect")
    assert len(long) == 101 and set(long.tolist()) == {0.5, -0.5}


def test_fix_length_rejects_bad_arguments() -> None:
    x = np.zeros(3, dtype=np.float32)
    with pytest.raises(ValueError, match="side"):
        fix_length(x, 5, side="middle")
    with pytest.raises(ValueError, match="mode"):
        fix_length(x, 5, mode="wrap")


@pytest.mark.parametrize("suffix", [".wav", ".flac"])
def test_write_read_round_trip(tmp_path: Path, suffix: str) -> None:
    x = sine(440, 16000)
    write_audio(tmp_path / f"out{suffix}", x, 16000)
    y, rate = read_audio(tmp_path / f"out{suffix}")
    assert rate == 16000 and sf.info(str(tmp_path / f"out{suffix}")).subtype == "PCM_16"
    np.testing.assert_allclose(y, x, atol=1.0 / 32768 + 1e-7)
    assert [p.name for p in tmp_path.iterdir()] == [f"out{suffix}"]  # no temporary file left


def test_write_clips_and_cleans(tmp_path: Path) -> None:
    write_audio(tmp_path / "c.wav", np.array([2.0, -3.0, np.nan, 0.25]), 8000)
    y, _ = read_audio(tmp_path / "c.wav")
    np.testing.assert_allclose(y, [32767 / 32768, -1.0, 0.0, 0.25], atol=1e-4)
    with pytest.raises(VqkitError, match=r"must end in \.wav or \.flac"):
        write_audio(tmp_path / "c.mp3", y, 8000)


def test_read_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(VqkitError, match="no such file"):
        read_audio(tmp_path / "missing.wav")
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk" + bytes(50))
    with pytest.raises(VqkitError, match=r"corrupt\.wav: cannot decode audio"):
        read_audio(tmp_path / "corrupt.wav")
    sf.write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), 8000)
    with pytest.raises(VqkitError, match="no samples"):
        read_audio(tmp_path / "empty.wav")
    bad = sine(100, 8000)
    bad[10] = np.nan
    sf.write(tmp_path / "nan.wav", bad, 8000, subtype="FLOAT")
    with pytest.raises(VqkitError, match="NaN or Inf"):
        read_audio(tmp_path / "nan.wav")
    sf.write(tmp_path / "silent.wav", np.zeros(100, dtype=np.float32), 8000)
    assert np.array_equal(read_audio(tmp_path / "silent.wav")[0], np.zeros(100))  # silence is fine
