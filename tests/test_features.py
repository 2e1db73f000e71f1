"""Front ends against librosa, inverses, Griffin-Lim and the normalisers."""

from __future__ import annotations

import librosa
import numpy as np
import pytest
import torch

from vqkit.audio.frontends import make_frontend, ratek_frequencies
from vqkit.audio.stft import DB_FLOOR, griffin_lim, mel_filters
from vqkit.config import FeatureConfig
from vqkit.errors import VqkitError
from vqkit.nn.normalise import MeanStd, Normaliser, minmax_denormalise, minmax_normalise

ENVELOPE_DB = {"f0": 120.0, "peaks": ((700.0, 250.0, 20.0), (2200.0, 400.0, 12.0)), "tilt": 400.0}


def envelope_db(f: np.ndarray) -> np.ndarray:
    """A smooth two-formant envelope in dB with a downward tilt."""
    out = -f / ENVELOPE_DB["tilt"]
    for centre, width, height in ENVELOPE_DB["peaks"]:
        out = out + height * np.exp(-(((f - centre) / width) ** 2))
    return out


def voiced(sample_rate: int, seconds: float = 0.5, seed: int = 0) -> np.ndarray:
    """Harmonics of 120 Hz shaped by :func:`envelope_db`, plus a little noise: speech-like."""
    t = np.arange(int(sample_rate * seconds)) / sample_rate
    f0 = ENVELOPE_DB["f0"]
    ks = np.arange(1, int(0.48 * sample_rate / f0))
    amps = 10.0 ** (envelope_db(ks * f0) / 20.0)
    y = (amps[:, None] * np.cos(2 * np.pi * f0 * ks[:, None] * t + 0.3 * ks[:, None] ** 2)).sum(0)
    y += 0.01 * np.random.default_rng(seed).standard_normal(t.shape[0])
    return (0.5 * y / np.abs(y).max()).astype(np.float32)


def frontend(sample_rate: int = 16000, **kw):
    return make_frontend(FeatureConfig(**kw), sample_rate)


def assert_db_close(x: np.ndarray, ref: np.ndarray, power: bool = False) -> None:
    """Equal to float32 FFT precision: 0.002 dB within 60 dB of the peak, 1e-5 of the peak's
    linear value everywhere (quiet bins differ more in dB as the FFT rounding dominates them)."""
    assert x.shape == ref.shape
    loud = ref > ref.max() - 60
    np.testing.assert_allclose(x[loud], ref[loud], atol=2e-3, rtol=0)
    scale = 10.0 if power else 20.0
    lin, lin_ref = 10.0 ** (x / scale), 10.0 ** (ref / scale)
    np.testing.assert_allclose(lin, lin_ref, atol=1e-5 * lin_ref.max(), rtol=0)


# --- parity with librosa ---------------------------------------------------------------------


@pytest.mark.parametrize("win_length", [0, 400])
def test_stft_matches_librosa(win_length: int) -> None:
    y = voiced(16000)[:4001]  # odd length
    x = frontend(kind="stft", win_length=win_length)(torch.from_numpy(y))[0].numpy()
    spec = librosa.stft(y, n_fft=512, hop_length=128, win_length=win_length or None)
    ref = librosa.amplitude_to_db(np.abs(spec), ref=1.0, amin=1e-5, top_db=None)
    assert x.shape == (257, 1 + 4001 // 128)
    assert_db_close(x, ref)


@pytest.mark.parametrize(
    "sample_rate,n_fft,hop_length,n_mels,fmin,fmax",
    [(16000, 512, 128, 80, 0.0, 0.0), (22050, 1024, 256, 128, 50.0, 8000.0)],
)
def test_mel_matches_librosa(sample_rate, n_fft, hop_length, n_mels, fmin, fmax) -> None:
    y = voiced(sample_rate)
    fe = make_frontend(
        FeatureConfig(kind="mel", n_fft=n_fft, hop_length=hop_length, n_mels=n_mels, fmin=fmin,
                      fmax=fmax),
        sample_rate,
    )  # fmt: skip
    x = fe(torch.from_numpy(y))[0].numpy()
    mel = librosa.feature.melspectrogram(
        y=y, sr=sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels, fmin=fmin,
        fmax=fmax or None,
    )  # fmt: skip
    ref = librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=None)
    assert x.shape == (n_mels, 1 + len(y) // hop_length)
    assert_db_close(x, ref, power=True)
    basis = librosa.filters.mel(
        sr=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax or sample_rate / 2
    )
    np.testing.assert_allclose(fe.mel_basis.numpy(), basis, atol=1e-7)


def test_ratek_matches_numpy_on_librosa_stft() -> None:
    y = voiced(8000)
    fe = frontend(8000, kind="ratek", n_fft=256, hop_length=80)
    x = fe(torch.from_numpy(y))[0].numpy()
    log_spec = librosa.amplitude_to_db(
        np.abs(librosa.stft(y, n_fft=256, hop_length=80)), ref=1.0, amin=1e-5, top_db=None
    )
    cepstrum = np.fft.irfft(log_spec, n=256, axis=0)
    q = int(0.002 * 8000)
    cepstrum[q + 1 : 256 - q] = 0.0
    envelope = np.fft.rfft(cepstrum, axis=0).real
    bin_freqs = np.fft.rfftfreq(256, 1 / 8000)
    ref = np.stack([np.interp(fe.freqs, bin_freqs, frame) for frame in envelope.T], axis=1)
    assert x.shape == (20, 1 + len(y) // 80)
    np.testing.assert_allclose(x, ref, atol=5e-3)


def test_ratek_follows_the_spectral_envelope() -> None:
    fe = frontend(8000, kind="ratek", n_fft=512, hop_length=80)  # Codec 2's 512-point FFT
    x = fe(torch.from_numpy(voiced(8000)))[0, :, 5:-5].mean(dim=1).numpy()
    truth = envelope_db(fe.freqs)
    assert np.corrcoef(x, truth)[0, 1] > 0.95
    assert np.sqrt(np.mean((x - x.mean() - truth + truth.mean()) ** 2)) < 3.0  # dB


def test_ratek_frequencies_are_codec2s() -> None:
    freqs = ratek_frequencies(20)
    assert freqs.shape == (20,) and np.all(np.diff(freqs) > 0)
    assert abs(freqs[0] - 200.0) < 1.0 and abs(freqs[-1] - 3700.0) < 2.0
    mels = librosa.hz_to_mel(freqs, htk=True)  # 2595 log10(1 + f / 700), Codec 2's ftomel
    np.testing.assert_allclose(mels, np.linspace(283.0, 2072.0, 20), atol=1e-3)


def test_each_feature_row_knows_its_frequency() -> None:
    stft = frontend(kind="stft", n_fft=256).frequencies()
    np.testing.assert_allclose(stft, librosa.fft_frequencies(sr=16000, n_fft=256))
    mel = frontend(kind="mel", n_fft=512, n_mels=40, fmin=50.0, fmax=7000.0).frequencies()
    np.testing.assert_allclose(mel, librosa.mel_frequencies(42, fmin=50.0, fmax=7000.0)[1:-1])
    ratek = frontend(8000, kind="ratek", rate_k=20).frequencies()
    np.testing.assert_allclose(ratek, ratek_frequencies(20))
    envelope = frontend(kind="envelope", n_fft=512, win_length=320, rate_k=40).frequencies()
    assert envelope.shape == (40,) and np.all(np.diff(envelope) > 0)
    assert envelope[0] == pytest.approx(60.0) and envelope[-1] == pytest.approx(0.49 * 16000)


# --- shapes, inverses, errors ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["stft", "mel", "ratek"])
@pytest.mark.parametrize("n_samples", [1, 127, 128, 129, 1001])
def test_frame_count_and_shapes(kind: str, n_samples: int) -> None:
    fe = frontend(kind=kind)
    wave = torch.randn(3, n_samples) * 0.1
    x = fe(wave)
    assert x.shape == (3, fe.n_bins, fe.n_frames(n_samples)) == (3, fe.n_bins, 1 + n_samples // 128)
    assert fe(wave[0]).shape == (1, fe.n_bins, fe.n_frames(n_samples))
    assert torch.isfinite(x).all() and x.min() >= DB_FLOOR


@pytest.mark.parametrize("kind", ["stft", "mel", "ratek"])
def test_silence_is_the_floor(kind: str) -> None:
    x = frontend(kind=kind)(torch.zeros(1000))
    torch.testing.assert_close(x, torch.full_like(x, DB_FLOOR))


def test_stft_to_magnitude_is_exact() -> None:
    fe = frontend(kind="stft")
    wave = torch.from_numpy(voiced(16000))[None]
    magnitude = fe.stft(wave).abs()
    back = fe.to_magnitude(fe(wave))
    assert back.shape == (1, 257, fe.n_frames(wave.shape[1]))
    torch.testing.assert_close(back, magnitude.clamp(min=1e-5), rtol=1e-4, atol=0)


def test_mel_inverse_is_consistent_and_beats_librosa() -> None:
    fe = frontend(kind="mel")
    y = voiced(16000)
    x = fe(torch.from_numpy(y))
    magnitude = fe.to_magnitude(x)
    assert magnitude.shape == (1, 257, x.shape[-1]) and (magnitude >= 0).all()
    loud = x > x.max() - 60
    error = (fe.from_magnitude(magnitude) - x).abs()[loud].mean()
    mel = librosa.feature.melspectrogram(y=y, sr=16000, n_fft=512, hop_length=128)
    ref = librosa.feature.inverse.mel_to_stft(mel, sr=16000, n_fft=512)
    ref_error = (fe.from_magnitude(torch.from_numpy(ref)[None]) - x).abs()[loud].mean()
    assert error < 0.05 and error < ref_error


def test_frontend_passes_gradients() -> None:
    wave = (torch.randn(2, 800) * 0.1).requires_grad_()
    frontend(kind="mel")(wave).sum().backward()
    assert torch.isfinite(wave.grad).all() and wave.grad.abs().sum() > 0


def test_frontend_errors() -> None:
    with pytest.raises(VqkitError, match="no inverse"):
        frontend(kind="ratek").to_magnitude(torch.zeros(1, 20, 3))
    with pytest.raises(VqkitError, match="no audio front end"):
        frontend(kind="image")
    with pytest.raises(VqkitError, match="too many"):
        frontend(kind="mel", n_fft=64, n_mels=128)
    with pytest.raises(VqkitError, match="win_length"):
        frontend(kind="stft", win_length=1024)
    with pytest.raises(VqkitError, match="below sample_rate"):
        frontend(6000, kind="ratek")
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        frontend()(torch.zeros(1, 1, 100))
    with pytest.raises(ValueError, match=r"\(B, 257, N\)"):
        frontend().to_magnitude(torch.zeros(1, 80, 3))
    assert mel_filters(16000, 512, 80, 0.0, 8000.0).shape == (80, 257)


# --- Griffin-Lim -----------------------------------------------------------------------------


def test_griffin_lim_matches_librosa_from_the_same_start() -> None:
    y = voiced(16000).astype(np.float64)  # float64: momentum amplifies float32 rounding
    magnitude = np.abs(librosa.stft(y, n_fft=512, hop_length=128))
    ref = librosa.griffinlim(magnitude, n_iter=8, hop_length=128, n_fft=512, init=None)
    m = torch.from_numpy(magnitude)[None]
    start = torch.ones_like(m, dtype=torch.complex128)  # librosa's init=None: zero phase
    ours = griffin_lim(m, n_fft=512, hop_length=128, n_iter=8, angles=start)
    np.testing.assert_allclose(ours[0].numpy(), ref, atol=1e-8)


def spectral_convergence(wave: torch.Tensor, magnitude: torch.Tensor) -> float:
    rebuilt = frontend(kind="stft").stft(wave).abs()
    return float((rebuilt - magnitude).norm() / magnitude.norm())


def test_griffin_lim_recovers_a_consistent_phase() -> None:
    wave = torch.from_numpy(np.stack([voiced(16000, seed=0), voiced(16000, seed=1)]))
    magnitude = frontend(kind="stft").stft(wave).abs()
    y = griffin_lim(magnitude, n_fft=512, hop_length=128, n_iter=32, length=wave.shape[1])
    assert y.shape == wave.shape
    zero_phase = torch.istft(magnitude.to(torch.complex64), 512, 128, window=torch.hann_window(512),
                             length=wave.shape[1])  # fmt: skip
    assert spectral_convergence(y, magnitude) < 0.15
    assert spectral_convergence(y, magnitude) < 0.5 * spectral_convergence(zero_phase, magnitude)
    alone = griffin_lim(magnitude[1:], n_fft=512, hop_length=128, n_iter=32, length=wave.shape[1])
    torch.testing.assert_close(y[1:], alone)  # an item does not depend on its batch


def test_griffin_lim_seed_length_and_errors() -> None:
    magnitude = frontend(kind="stft").stft(torch.randn(1, 1000)).abs()
    a = griffin_lim(magnitude, n_fft=512, hop_length=128, n_iter=2, seed=1)
    b = griffin_lim(magnitude, n_fft=512, hop_length=128, n_iter=2, seed=1)
    c = griffin_lim(magnitude, n_fft=512, hop_length=128, n_iter=2, seed=2)
    assert a.shape == (1, (magnitude.shape[-1] - 1) * 128)
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="n_iter"):
        griffin_lim(magnitude, n_fft=512, hop_length=128, n_iter=0)
    with pytest.raises(ValueError, match="expected magnitude"):
        griffin_lim(magnitude, n_fft=1024, hop_length=128)


# --- normalisers -----------------------------------------------------------------------------


@pytest.mark.parametrize("low,high", [(0.0, 1.0), (-1.0, 1.0)])
def test_minmax_round_trip(low: float, high: float) -> None:
    x = torch.randn(3, 20, 7) * 20 - 40
    x_norm, x_min, x_max = minmax_normalise(x, low, high)
    assert x_min.shape == x_max.shape == (3,)
    torch.testing.assert_close(x_norm.amin(dim=(1, 2)), torch.full((3,), low))
    torch.testing.assert_close(x_norm.amax(dim=(1, 2)), torch.full((3,), high))
    torch.testing.assert_close(minmax_denormalise(x_norm, x_min, x_max, low, high), x)
    single, s_min, s_max = minmax_normalise(x[0], low, high)
    assert s_min.shape == () and torch.equal(single, x_norm[0])
    constant = torch.full((1, 4, 5), DB_FLOOR)
    flat, c_min, c_max = minmax_normalise(constant, low, high)
    assert torch.equal(flat, torch.full_like(flat, low))
    assert torch.equal(minmax_denormalise(flat, c_min, c_max, low, high), constant)


def test_meanstd_round_trip_and_errors() -> None:
    x = torch.randn(4, 6, 50) * 10 + torch.arange(6.0)[:, None] * 5
    norm = MeanStd(x.mean(dim=(0, 2)), x.std(dim=(0, 2)))
    y = norm.normalise(x)
    torch.testing.assert_close(y.mean(dim=(0, 2)), torch.zeros(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(norm.denormalise(y), x, atol=1e-4, rtol=0)
    assert set(norm.state_dict()) == {"mean", "std"}
    with pytest.raises(ValueError, match=r"\(B, 6, N\)"):
        norm.normalise(torch.zeros(1, 5, 3))
    with pytest.raises(ValueError, match="positive"):
        MeanStd(torch.zeros(3), torch.zeros(3))


@pytest.mark.parametrize("kind", ["none", "minmax", "minmax_sym", "meanstd"])
def test_normaliser_round_trip(kind: str) -> None:
    x = torch.randn(2, 5, 9) * 15 - 30
    norm = Normaliser(kind, mean=torch.full((5,), -30.0), std=torch.full((5,), 15.0))
    side = norm.side_info(x)
    assert side.shape == (2, norm.n_side)
    y = norm.normalise(x, side)
    torch.testing.assert_close(y, norm.normalise(x))
    torch.testing.assert_close(norm.denormalise(y, side), x, atol=1e-4, rtol=0)
    if kind.startswith("minmax"):
        ref, _, _ = minmax_normalise(x, norm.low, norm.high)
        torch.testing.assert_close(y, ref)
        crop = norm.normalise(x[..., :3], side)  # a crop keeps its utterance's scale
        torch.testing.assert_close(crop, y[..., :3])


def test_normaliser_errors() -> None:
    with pytest.raises(VqkitError, match="features.normalise"):
        Normaliser("minmx")
    with pytest.raises(ValueError, match="mean and std"):
        Normaliser("meanstd")
