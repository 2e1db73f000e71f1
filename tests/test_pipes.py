"""The command line's live side: raw PCM and packet streams through pipes, and bad streams."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_PARAMETRIC_RATE as RATE
from test_stream import save_parametric

from vqkit.cli import main
from vqkit.codec.codec import load_codec
from vqkit.codec.packets import header_size
from vqkit.codec.pipes import decode_stream, encode_stream
from vqkit.errors import VqkitError


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, speech: np.ndarray) -> Path:  # noqa: F811
    return save_parametric(tmp_path_factory.mktemp("pipes") / "m.safetensors", speech)


def pcm(wave: np.ndarray) -> bytes:
    return (np.clip(wave, -1, 1) * 32767).astype("<i2").tobytes()


def encode(model: Path, wave: np.ndarray, **kw) -> bytes:
    out = io.BytesIO()
    encode_stream(io.BytesIO(pcm(wave)), out, model, sample_rate=RATE, **kw)
    return out.getvalue()


def decode(model: Path, data: bytes, conceal: bool = False) -> tuple[bytes, str | None]:
    """Raw PCM decoded from ``data``, and the error message if it stopped."""
    out = io.BytesIO()
    try:
        decode_stream(io.BytesIO(data), out, model, conceal=conceal)
    except VqkitError as e:
        return out.getvalue(), str(e)
    return out.getvalue(), None


def test_pcm_to_stream_to_pcm(model: Path, speech: np.ndarray) -> None:  # noqa: F811
    codec = load_codec(model)
    data = encode(model, speech)
    size = codec.stream_encoder().header.packet_size
    body = data[header_size(data) :]
    assert len(body) % size == 0 and len(body) // size == -(-len(speech) // (4 * 80))
    out, error = decode(model, data)
    assert error is None and len(out) == 2 * (len(body) // size * 320 - 1)
    decoded = np.frombuffer(out, "<i2").astype(np.float32) / 32767
    assert np.sqrt(np.mean(decoded**2)) > 1e-3  # a random model: sound, not silence


@pytest.mark.parametrize("raw_format, dtype", [("s32le", "<i4"), ("f32le", "<f4")])
def test_other_raw_formats(model: Path, speech, raw_format: str, dtype: str) -> None:  # noqa: F811
    scale = 2**31 - 1 if dtype == "<i4" else 1
    raw = (speech * scale).astype(dtype).tobytes()
    out = io.BytesIO()
    encode_stream(io.BytesIO(raw), out, model, sample_rate=RATE, raw_format=raw_format)
    data, reference = out.getvalue(), encode(model, speech)
    # the same header and packets; a packet may differ where quantisation noise flips a code
    size = header_size(data)
    assert len(data) == len(reference) and data[:size] == reference[:size]
    same = np.frombuffer(data, np.uint8) == np.frombuffer(reference, np.uint8)
    assert same.mean() > 0.9


def test_cut_stream_errors_after_writing_what_it_decoded(model: Path, speech) -> None:  # noqa: F811
    data = encode(model, speech)
    whole, _ = decode(model, data)
    cut = data[: len(data) - 3]  # the pipe closed mid-packet
    out, error = decode(model, cut)
    assert error is not None and "into packet" in error
    assert 0 < len(out) < len(whole)
    concealed, error = decode(model, cut, conceal=True)
    assert error is None and len(concealed) == len(whole)


def test_garbage_after_the_header_is_caught(model: Path, speech) -> None:  # noqa: F811
    data = encode(model, speech, bitrate=load_codec(model).bitrates[3])  # 6 padding bits
    start = header_size(data) + 5 * 6
    garbage = data[:start] + b"garbage after the header!" * 4
    out, error = decode(model, garbage)
    assert error is not None and "packet 5" in error and len(out) > 0
    out, error = decode(model, garbage, conceal=True)
    assert error is None and np.isfinite(np.frombuffer(out, "<i2")).all()


def test_stream_from_another_model(model: Path, tmp_path: Path, speech) -> None:  # noqa: F811
    other = save_parametric(tmp_path / "other.safetensors", speech[::-1].copy())
    out, error = decode(other, encode(model, speech))
    assert error is not None and "not this model" in error and out == b""


def test_convert_round_trips_through_the_cli(model: Path, tmp_path: Path, speech) -> None:  # noqa: F811
    import soundfile as sf

    sf.write(tmp_path / "in.wav", speech, RATE)
    vqc, vqs, back = tmp_path / "a.vqc", tmp_path / "a.vqs", tmp_path / "b.vqc"
    assert main(["encode", str(tmp_path / "in.wav"), str(vqc), "--model", str(model)]) == 0
    assert main(["convert", str(vqc), str(vqs), "--model", str(model)]) == 0
    assert main(["convert", str(vqs), str(back)]) == 0
    assert back.read_bytes() == vqc.read_bytes()
    assert main(["decode", str(vqs), str(tmp_path / "out.wav"), "--model", str(model)]) == 0
    out = sf.read(tmp_path / "out.wav")[0]
    assert len(out) == len(speech)
    assert main(["convert", str(tmp_path / "in.wav"), str(back)]) == 1


@pytest.mark.slow
def test_shell_pipeline(model: Path, speech, tmp_path: Path) -> None:  # noqa: F811
    """``cat raw | vqkit encode - - | vqkit decode - -`` as separate processes."""
    vqkit = f"{sys.executable} -m vqkit"
    raw = tmp_path / "in.raw"
    raw.write_bytes(pcm(speech))
    command = (
        f"cat {raw} | {vqkit} encode - - --model {model} --rate {RATE} "
        f"| {vqkit} decode - - --model {model}"
    )
    result = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command], capture_output=True, env=dict(os.environ)
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout) == 2 * (-(-len(speech) // 320) * 320 - 1)
    header = len(load_codec(model).stream_encoder().header.to_bytes())
    cut = f"cat {raw} | {vqkit} encode - - --model {model} --rate {RATE} 2>/dev/null"
    cut += f" | head -c {header + 33}"
    cut += f" | {vqkit} decode - - --model {model}"
    result = subprocess.run(["bash", "-c", cut], capture_output=True, env=dict(os.environ))
    assert result.returncode == 1 and len(result.stdout) > 0  # what came before is out
    assert result.stderr.decode().count("\n") == 1 and "vqkit: error:" in result.stderr.decode()


def test_pcm_at_another_rate_comes_back_at_its_rate(model: Path, speech) -> None:  # noqa: F811
    import soxr

    wide = soxr.resample(speech, RATE, 2 * RATE).astype(np.float32)
    out = io.BytesIO()
    encode_stream(io.BytesIO(pcm(wide)), out, model, sample_rate=2 * RATE)
    decoded, error = decode(model, out.getvalue())
    assert error is None and abs(len(decoded) // 2 - len(wide)) <= 2 * 320 * 2


def test_empty_input_is_an_error(model: Path) -> None:
    with pytest.raises(VqkitError, match="no audio"):
        encode_stream(io.BytesIO(b""), io.BytesIO(), model)
    with pytest.raises(VqkitError, match="middle of a sample"):
        encode_stream(io.BytesIO(b"\x01\x02\x03"), io.BytesIO(), model)


def test_a_vqc_file_decodes_from_standard_input(model: Path, speech) -> None:  # noqa: F811
    encoded = load_codec(model).encode(speech, RATE)
    out, error = decode(model, encoded.to_bytes())
    assert error is None and len(out) == 2 * len(speech)


def test_streams_joined_end_to_end(model: Path, speech) -> None:  # noqa: F811
    bitrates = load_codec(model).bitrates
    first, second = encode(model, speech), encode(model, speech[::-1].copy())
    alone, _ = decode(model, first)
    joined, error = decode(model, first + second)  # cat a.vqs b.vqs: one stream, twice as long
    assert error is None and len(joined) == 2 * len(alone) + 2
    other = encode(model, speech, bitrate=bitrates[1])  # another bitrate follows
    out, error = decode(model, first + other)
    assert error is not None and "another model or bitrate" in error
    assert len(out) == len(alone)  # the first stream, whole
