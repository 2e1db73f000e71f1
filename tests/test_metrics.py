"""Metrics on known cases: identical signals score at the top, noise scores lower, failures are
recorded as failures, codebook statistics on hand-made codes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vqkit.eval import metrics

RATE = 16000


def speechlike(seed: int, seconds: float, sample_rate: int = RATE) -> np.ndarray:
    """Speech-like sound: 0.3 s syllables (gliding-pitch harmonics under a moving formant, with
    a little noise) separated by 50 ms pauses, float32 (T,) in [-0.5, 0.5]."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(0.3 * sample_rate)) / sample_rate
    parts = []
    while sum(p.size for p in parts) < seconds * sample_rate:
        pitch = rng.uniform(100, 200) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(1, 3) * t))
        phase = 2 * np.pi * np.cumsum(pitch) / sample_rate
        formant = rng.uniform(500, 1500) * (1 + 0.3 * np.sin(2 * np.pi * t))
        k = np.arange(1, 25)[:, None]
        voiced = np.sum(np.exp(-(((k * pitch - formant) / 600) ** 2)) * np.sin(k * phase) / k, 0)
        syllable = np.sin(np.pi * t / t[-1]) * (voiced + 0.01 * rng.standard_normal(t.size))
        parts += [0.5 * syllable / np.abs(syllable).max(), np.zeros(sample_rate // 20)]
    return np.concatenate(parts)[: int(seconds * sample_rate)].astype(np.float32)


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    """1.6 s of speech-like sound at 16 kHz."""
    return speechlike(1, 1.6)


def noisy(x: np.ndarray, snr_db: float, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).standard_normal(x.shape)
    noise *= np.sqrt(np.mean(x**2) / np.mean(noise**2) / 10 ** (snr_db / 10))
    return (x + noise).astype(np.float32)


@pytest.mark.parametrize(
    ("name", "top"),
    [("pesq_nb", 4.4), ("pesq_wb", 4.4), ("stoi", 0.999)],
)
def test_perceptual_metrics_top_on_identity_and_drop_with_noise(clip, name, top):
    fn = getattr(metrics, name)
    clean = fn(clip, clip, RATE)
    mild, strong = fn(clip, noisy(clip, 20), RATE), fn(clip, noisy(clip, 0), RATE)
    assert clean >= top
    assert clean > mild > strong


@pytest.mark.parametrize(
    "fn",
    [
        lambda x, y: metrics.log_spectral_distance_db(x, y),
        lambda x, y: metrics.mel_distance_db(x, y, RATE),
        lambda x, y: metrics.feature_distortion_db2(x, y, RATE, kind="mel"),
        lambda x, y: metrics.feature_distortion_db2(x, y, RATE, kind="ratek"),
        metrics.mse,
    ],
    ids=["lsd", "mel", "sd_mel", "sd_ratek", "mse"],
)
def test_distances_zero_on_identity_and_grow_with_noise(clip, fn):
    assert fn(clip, clip) == pytest.approx(0.0, abs=1e-6)
    assert 0.0 < fn(clip, noisy(clip, 20)) < fn(clip, noisy(clip, 0))


def test_si_sdr_ignores_scale_and_falls_with_noise(clip):
    assert metrics.si_sdr(clip, 0.3 * clip) > 60.0
    assert metrics.si_sdr(clip, noisy(clip, 10)) == pytest.approx(10.0, abs=0.5)


def test_mel_distance_of_a_gain_is_its_db(clip):
    # A gain of 0.5 is -6.02 dB in every mel band above the floor.
    loud = clip + 1e-3 * np.random.default_rng(0).standard_normal(clip.shape).astype(np.float32)
    assert metrics.mel_distance_db(loud, 0.5 * loud, RATE) == pytest.approx(6.02, abs=0.05)


def test_spectral_distortion_of_known_offsets():
    x = torch.randn(2, 5, 7)
    offset = torch.tensor([3.0, 0.0]).view(2, 1, 1)
    assert torch.allclose(metrics.spectral_distortion_db(x, x + offset), torch.tensor([3.0, 0]))
    assert torch.allclose(metrics.spectral_distortion_db2(x, x + offset), torch.tensor([9.0, 0]))
    # RMS per frame, then mean over frames: frames with errors 0 and 4 dB give 2 dB (not sqrt 8).
    x_hat = x.clone()
    x_hat[:, :, :1] += 4.0
    y, y_hat = x[:, :, :2], x_hat[:, :, :2]
    assert torch.allclose(metrics.spectral_distortion_db(y, y_hat), torch.tensor([2.0, 2.0]))


def test_shape_errors_say_expected_and_actual():
    with pytest.raises(ValueError, match=r"\(B, F, N\).*\(2, 5\)"):
        metrics.spectral_distortion_db(torch.zeros(2, 5), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="same shape"):
        metrics.mse(np.zeros(10), np.zeros(11))


def test_failures_are_recorded_not_numbers(clip):
    silence = np.zeros(RATE, dtype=np.float32)
    failed = metrics.try_metric(metrics.pesq_wb, silence, silence, RATE)
    assert metrics.is_failed(failed) and "silent" in failed["error"]
    for fn in (metrics.stoi, metrics.pesq_nb, metrics.si_sdr):
        args = (silence, clip[:RATE]) if fn is metrics.si_sdr else (silence, clip[:RATE], RATE)
        assert metrics.try_metric(fn, *args) == {"error": "reference is silent"}
    lsd = metrics.try_metric(metrics.log_spectral_distance_db, silence, clip[:RATE])
    assert lsd == {"error": "reference is silent"}
    too_short = metrics.try_metric(metrics.stoi, clip[:2000], clip[:2000], RATE)
    assert metrics.is_failed(too_short) and "STOI" in too_short["error"]
    # PESQ's own errors come back with their message (bytes in pesq, decoded here).
    short = metrics.try_metric(metrics.pesq_nb, clip[:1000], clip[:1000], RATE)
    assert short == {"error": "PESQ: Buffer needs to be at least 1/4 of a second long"}
    summary = metrics.summarise([1.0, failed, 3.0, too_short])
    assert summary == {"mean": 2.0, "std": 1.0, "n": 2, "n_failed": 2}
    assert metrics.summarise([failed]) == {"mean": None, "std": None, "n": 0, "n_failed": 1}


def test_codebook_usage_and_perplexity():
    k = 8
    uniform = np.tile(np.arange(k), 3)[None]  # (1, 24): every code three times
    single = np.zeros((1, 24), dtype=np.int64)
    codes = np.concatenate([uniform, single])  # (Q=2, N=24)
    assert np.allclose(metrics.codebook_perplexity(codes, k), [k, 1.0])
    assert np.allclose(metrics.codebook_usage(codes, k), [1.0, 1 / k])
    # A list of (Q, N') arrays of different lengths and a (B, Q, N) batch give the same counts.
    parts = [codes[:, :10], codes[:, 10:]]
    assert np.allclose(metrics.codebook_perplexity(parts, k), [k, 1.0])
    assert np.allclose(metrics.codebook_usage(codes[None], k), [1.0, 1 / k])
    with pytest.raises(ValueError, match="outside 0..7"):
        metrics.codebook_usage(codes + 1, k)


def test_spectral_distances_at_once_equal_the_single_metrics(clip):
    y = noisy(clip, 10)
    together = metrics.spectral_distances(clip, y, RATE)
    assert together["mel_db"] == pytest.approx(metrics.mel_distance_db(clip, y, RATE))
    for kind in ("mel", "ratek"):
        single = metrics.feature_distortion_db2(clip, y, RATE, kind=kind)
        assert together[f"sd_{kind}_db2"] == pytest.approx(single)
    failed = metrics.spectral_distances(clip, y[:-1], RATE)
    assert all(metrics.is_failed(v) and "same shape" in v["error"] for v in failed.values())


def test_active_level_ignores_pauses_and_follows_gain():
    rate = 16000
    tone = 0.1 * np.sin(2 * np.pi * 200 * np.arange(rate) / rate)  # RMS 0.1 / sqrt(2): -23.01 dB
    with_pause = np.concatenate([tone, np.zeros(rate), 1e-4 * tone])
    assert metrics.active_level_db(tone, rate) == pytest.approx(-23.01, abs=0.01)
    assert metrics.active_level_db(with_pause, rate) == pytest.approx(-23.01, abs=0.01)
    assert metrics.active_level_db(2 * with_pause, rate) == pytest.approx(-23.01 + 6.02, abs=0.01)
    with pytest.raises(ValueError, match="silence"):
        metrics.active_level_db(np.zeros(rate), rate)
