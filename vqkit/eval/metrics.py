"""Quality metrics for speech codecs: PESQ, STOI, spectral distances, SI-SDR, active-speech
level, codebook usage.

Waveform metrics take a reference ``x`` and a reconstruction ``x_hat``, both float ``(T,)`` of the
same length at ``sample_rate``, and return a float; they raise ``ValueError`` or ``RuntimeError``
when the score is undefined (silence, too short). :func:`try_metric` turns such a failure into a
record ``{"error": reason}`` so a failed score is never mistaken for a number, and
:func:`summarise` averages the numbers while counting the failures.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vqkit.audio.io import resample
from vqkit.audio.stft import stft
from vqkit.nn import codebook
from vqkit.train.losses import LSD_FLOOR_DB, spectral_distortion_db, spectral_distortion_db2

PESQ_NB_RATE = 8000
PESQ_WB_RATE = 16000

Score = float | dict[str, str]


def _check_pair(x: np.ndarray, x_hat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    x_hat = np.asarray(x_hat, dtype=np.float64)
    if x.ndim != 1 or x.shape != x_hat.shape:
        raise ValueError(
            f"expected x and x_hat of the same shape (T,), got {x.shape} and {x_hat.shape}"
        )
    if not (np.isfinite(x).all() and np.isfinite(x_hat).all()):
        raise ValueError("signal contains NaN or Inf")
    return x, x_hat


def _pesq(x: np.ndarray, x_hat: np.ndarray, sample_rate: int, rate: int, mode: str) -> float:
    from pesq import pesq

    x, x_hat = _check_pair(x, x_hat)
    if not np.any(x):
        raise ValueError("reference is silent")
    x = resample(x.astype(np.float32), sample_rate, rate)
    x_hat = resample(x_hat.astype(np.float32), sample_rate, rate)
    try:
        return float(pesq(rate, x, x_hat, mode))
    except RuntimeError as e:  # pesq's errors carry bytes messages
        reason = e.args[0].decode() if e.args and isinstance(e.args[0], bytes) else str(e)
        raise RuntimeError(f"PESQ: {reason}") from None


def pesq_nb(x: np.ndarray, x_hat: np.ndarray, sample_rate: int) -> float:
    """Narrow-band PESQ (MOS-LQO, -0.5..4.5) after resampling both signals to 8 kHz."""
    return _pesq(x, x_hat, sample_rate, PESQ_NB_RATE, "nb")


def pesq_wb(x: np.ndarray, x_hat: np.ndarray, sample_rate: int) -> float:
    """Wide-band PESQ (MOS-LQO, -0.5..4.5) after resampling both signals to 16 kHz."""
    return _pesq(x, x_hat, sample_rate, PESQ_WB_RATE, "wb")


def stoi(x: np.ndarray, x_hat: np.ndarray, sample_rate: int) -> float:
    """Short-time objective intelligibility (0..1) by pystoi."""
    from pystoi import stoi as _stoi

    x, x_hat = _check_pair(x, x_hat)
    if not np.any(x):
        raise ValueError("reference is silent")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        score = float(_stoi(x, x_hat, sample_rate, extended=False))
    for w in caught:  # pystoi warns and returns 1e-5 when too little speech is left
        if "STFT frames" in str(w.message):
            raise ValueError("STOI: not enough speech frames")
    return score


def _power_db(x: np.ndarray, n_fft: int, hop_length: int) -> Tensor:
    # reflect padding, as this metric was first defined (its figures stay comparable)
    spec = stft(torch.from_numpy(x).double(), n_fft, hop_length, pad_mode="reflect")
    return 10.0 * torch.log10(spec.abs() ** 2 + 1e-20)  # (F, N)


def log_spectral_distance_db(
    x: np.ndarray, x_hat: np.ndarray, *, n_fft: int = 512, hop_length: int = 128
) -> float:
    """Log-spectral distance in dB: per frame the RMS over bins of the power-spectrum dB
    difference, then the mean over frames. Both spectra are floored 80 dB below the reference's
    loudest bin, so silent stretches and empty bands count as a bounded error."""
    x, x_hat = _check_pair(x, x_hat)
    if not np.any(x):
        raise ValueError("reference is silent")
    if x.shape[0] < n_fft // 2 + 1:
        raise ValueError(f"signal of {x.shape[0]} samples is shorter than n_fft/2 = {n_fft // 2}")
    p, p_hat = _power_db(x, n_fft, hop_length), _power_db(x_hat, n_fft, hop_length)
    floor = p.max() - LSD_FLOOR_DB
    p, p_hat = p.clamp(min=floor), p_hat.clamp(min=floor)
    return float(spectral_distortion_db(p[None], p_hat[None])[0])


@functools.lru_cache(maxsize=8)
def _frontend(kind: str, sample_rate: int) -> Any:
    from vqkit.audio.frontends import make_frontend
    from vqkit.config import FeatureConfig

    return make_frontend(FeatureConfig(kind=kind), sample_rate).eval()


def _features_db(x: np.ndarray, x_hat: np.ndarray, kind: str, sample_rate: int) -> Tensor:
    x, x_hat = _check_pair(x, x_hat)
    frontend = _frontend(kind, sample_rate)
    with torch.no_grad():
        batch = torch.from_numpy(np.stack([x, x_hat]).astype(np.float32))
        return frontend(batch)  # (2, F, N) in dB


def feature_distortion_db2(
    x: np.ndarray, x_hat: np.ndarray, sample_rate: int, *, kind: str = "mel"
) -> float:
    """Spectral distortion in dB^2 on the vectors of one vqkit front end (``kind`` "mel": 80-band
    log-mel; "ratek": Codec 2's rate-K envelope), with the front end's default settings."""
    feats = _features_db(x, x_hat, kind, sample_rate)
    return float(spectral_distortion_db2(feats[:1], feats[1:])[0])


def mel_distance_db(x: np.ndarray, x_hat: np.ndarray, sample_rate: int) -> float:
    """Mean absolute difference of the 80-band log-mel spectrograms, in dB."""
    feats = _features_db(x, x_hat, "mel", sample_rate)
    return float((feats[0] - feats[1]).abs().mean())


def spectral_distances(x: np.ndarray, x_hat: np.ndarray, sample_rate: int) -> dict[str, Score]:
    """``mel_db`` (:func:`mel_distance_db`), ``sd_mel_db2`` and ``sd_ratek_db2``
    (:func:`feature_distortion_db2`) at once, running each front end once; failures recorded."""
    try:
        mel = _features_db(x, x_hat, "mel", sample_rate)
        ratek = _features_db(x, x_hat, "ratek", sample_rate)
    except (ValueError, RuntimeError) as e:
        failed = {"error": str(e) or type(e).__name__}
        return {"mel_db": failed, "sd_mel_db2": failed, "sd_ratek_db2": failed}
    return {
        "mel_db": float((mel[0] - mel[1]).abs().mean()),
        "sd_mel_db2": float(spectral_distortion_db2(mel[:1], mel[1:])[0]),
        "sd_ratek_db2": float(spectral_distortion_db2(ratek[:1], ratek[1:])[0]),
    }


def si_sdr(x: np.ndarray, x_hat: np.ndarray) -> float:
    """Scale-invariant signal-to-distortion ratio in dB (means removed)."""
    x, x_hat = _check_pair(x, x_hat)
    x, x_hat = x - x.mean(), x_hat - x_hat.mean()
    energy = float(np.dot(x, x))
    if energy == 0.0:
        raise ValueError("reference is silent")
    target = (np.dot(x_hat, x) / energy) * x
    noise = x_hat - target
    return float(10.0 * np.log10((np.dot(target, target) + 1e-20) / (np.dot(noise, noise) + 1e-20)))


def mse(x: np.ndarray, x_hat: np.ndarray) -> float:
    """Mean squared error of the samples."""
    x, x_hat = _check_pair(x, x_hat)
    return float(np.mean((x - x_hat) ** 2))


LEVEL_FRAME_SECONDS = 0.02  # frames of the active-speech level
LEVEL_GATE_DB = 35.0  # frames this far below the loudest one are pauses, not speech


def active_level_db(x: np.ndarray, sample_rate: int) -> float:
    """Active-speech level of ``x`` ``(T,)`` in dBFS: the RMS over the 20 ms frames no more than
    :data:`LEVEL_GATE_DB` below the loudest frame, so that pauses and silence do not count (a
    simple stand-in for the gated level of ITU-T P.56). Raises ``ValueError`` for silence."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"expected a waveform (T,), got {x.shape}")
    size = max(1, round(LEVEL_FRAME_SECONDS * sample_rate))
    frames = np.pad(x, (0, -len(x) % size)).reshape(-1, size)
    power = np.mean(frames**2, axis=1)
    if power.size == 0 or power.max() <= 0:
        raise ValueError("the active-speech level of silence is undefined")
    active = power[power >= power.max() * 10 ** (-LEVEL_GATE_DB / 10)]
    return float(10 * np.log10(active.mean()))


def code_counts(codes: np.ndarray | Sequence[np.ndarray], codebook_size: int) -> np.ndarray:
    """Per-stage code counts ``(Q, codebook_size)`` of arrays shaped (Q, N) or (B, Q, N), pooled
    (:func:`vqkit.nn.codebook.code_counts`)."""
    arrays = [np.asarray(codes)] if isinstance(codes, np.ndarray) else list(map(np.asarray, codes))
    arrays = [a[None] if a.ndim == 2 else a for a in arrays]
    if not arrays or any(a.ndim != 3 for a in arrays):
        raise ValueError("expected codes shaped (Q, N) or (B, Q, N)")
    flat = np.concatenate([a.transpose(1, 0, 2).reshape(a.shape[1], -1) for a in arrays], axis=1)
    return codebook.code_counts(torch.from_numpy(flat.astype(np.int64)), codebook_size).numpy()


def codebook_usage(codes: np.ndarray | Sequence[np.ndarray], codebook_size: int) -> np.ndarray:
    """Fraction of each stage's codebook used at least once, shape (Q,)."""
    counts = torch.from_numpy(code_counts(codes, codebook_size))
    return codebook.usage_and_perplexity(counts)[0].numpy()


def codebook_perplexity(codes: np.ndarray | Sequence[np.ndarray], codebook_size: int) -> np.ndarray:
    """Perplexity (exp of the entropy of code frequencies) of each stage, shape (Q,); equals
    ``codebook_size`` when every code is used equally often and 1 when one code is used."""
    counts = torch.from_numpy(code_counts(codes, codebook_size))
    return codebook.usage_and_perplexity(counts)[1].numpy()


def try_metric(fn: Callable[..., float], *args: Any, **kwargs: Any) -> Score:
    """Call a metric; a failure becomes ``{"error": reason}`` instead of a number."""
    try:
        value = fn(*args, **kwargs)
    except (ValueError, RuntimeError, ArithmeticError) as e:
        return {"error": str(e) or type(e).__name__}
    if not math.isfinite(value):
        return {"error": f"non-finite value {value}"}
    return value


def is_failed(score: Any) -> bool:
    """Whether a recorded score is a failure record rather than a number."""
    return isinstance(score, dict) and "error" in score


def failure_label(error: str | None) -> str:
    """A table cell for a metric no clip could score: "not installed" (an optional package is
    missing), "failed" (see the reason in the results), or "-" (not computed)."""
    if error is None:
        return "-"
    return "not installed" if error.startswith("not installed") else "failed"


def summarise(scores: Sequence[Score]) -> dict[str, float | int | None]:
    """Mean and (population) std of the numeric scores; failures are skipped and counted."""
    values = np.array([s for s in scores if not is_failed(s) and s is not None], dtype=np.float64)
    n_failed = sum(1 for s in scores if is_failed(s))
    if values.size == 0:
        return {"mean": None, "std": None, "n": 0, "n_failed": n_failed}
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "n": int(values.size),
        "n_failed": n_failed,
    }
