"""Spectral front ends (waveform -> features in dB) and their inverses, in torch.

One definition of each feature, pinned to librosa by tests (``tests/test_features.py``):

- STFT: :func:`vqkit.audio.stft.stft`, the same numbers as ``librosa.stft``.
- ``stft``: log-magnitude ``20 log10(max(|X|, 1e-5))`` dB, i.e. ``librosa.amplitude_to_db`` with
  ``ref=1, amin=1e-5, top_db=None``.
- ``mel``: log-mel power ``10 log10(max(M |X|^2, 1e-10))`` dB with librosa's default Slaney mel
  filters (``htk=False, norm="slaney"``), i.e. ``librosa.power_to_db(melspectrogram(...))``.
- ``ratek``: the rate-K vector of Codec 2 700C: the log spectral envelope in dB sampled at ``K``
  mel-spaced frequencies (Codec 2's ``mel_sample_freqs_kHz``, 200..3700 Hz by default). Codec 2
  samples the amplitudes of pitch harmonics; without a pitch track we take the envelope by cepstral
  smoothing of the log-magnitude spectrum (lifter below a 2 ms quefrency, under the pitch period of
  any voice up to 500 Hz) and interpolate it linearly. It is the mean of the log spectrum, so it
  sits a few dB below the harmonic peaks that Codec 2 would measure.

Both dB floors are -100 dB (:data:`vqkit.audio.stft.DB_FLOOR`): digital silence is -100 dB in
every kind. ``envelope`` (:mod:`vqkit.audio.envelope`) is the parametric codec's front end;
:func:`make_frontend` is the registry of all four.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import Tensor

from vqkit.audio.envelope import ENV_FLOOR_DB, EnvelopeFrontend
from vqkit.audio.stft import (
    DB_FLOOR,
    Frontend,
    hz_to_mel_htk,
    hz_to_mel_slaney,
    mel_filters,
    mel_to_hz_htk,
    mel_to_hz_slaney,
)
from vqkit.config import FeatureConfig, FeatureKind, choices
from vqkit.errors import VqkitError

KINDS = tuple(k for k in choices(FeatureKind) if k != "image")  # the audio ones
CODEC2_FMIN, CODEC2_FMAX = 200.0, 3700.0  # rate-K sampling range of Codec 2 700C
LIFTER_SECONDS = 0.002  # cepstral lifter cutoff for the rate-K envelope


class StftFrontend(Frontend):
    """Log-magnitude STFT in dB; ``F = n_fft // 2 + 1`` (the Nyquist bin is kept)."""

    def __init__(self, sample_rate: int, n_fft: int, hop_length: int, win_length: int) -> None:
        super().__init__(sample_rate, n_fft, hop_length, win_length, n_fft // 2 + 1)

    def from_magnitude(self, magnitude: Tensor) -> Tensor:
        return 20.0 * torch.log10(magnitude.clamp(min=10.0 ** (DB_FLOOR / 20.0)))

    def to_magnitude(self, features: Tensor) -> Tensor:
        _check_bins(features, self.n_bins)
        return torch.pow(10.0, features / 20.0)

    def frequencies(self) -> np.ndarray:
        return np.linspace(0.0, self.sample_rate / 2, self.n_bins)


class MelFrontend(Frontend):
    """Log-mel power in dB; ``F = n_mels``. Inverted by non-negative least squares."""

    def __init__(
        self,
        sample_rate: int,
        n_fft: int,
        hop_length: int,
        win_length: int,
        n_mels: int,
        fmin: float,
        fmax: float,
        nnls_iter: int = 100,
    ) -> None:
        super().__init__(sample_rate, n_fft, hop_length, win_length, n_mels)
        self.fmin, self.fmax, self.nnls_iter = fmin, fmax, nnls_iter
        basis = mel_filters(sample_rate, n_fft, n_mels, fmin, fmax).astype(np.float64)
        gram = basis.T @ basis
        self.register_buffer("mel_basis", _f32(basis), persistent=False)  # (n_mels, K)
        self.register_buffer("mel_pinv", _f32(np.linalg.pinv(basis)), persistent=False)
        self.register_buffer("gram", _f32(gram), persistent=False)  # (K, K)
        self.lipschitz = float(np.linalg.eigvalsh(gram).max())

    def from_magnitude(self, magnitude: Tensor) -> Tensor:
        mel = torch.matmul(self.mel_basis, magnitude.square())
        return 10.0 * torch.log10(mel.clamp(min=10.0 ** (DB_FLOOR / 10.0)))

    def to_magnitude(self, features: Tensor) -> Tensor:
        """Mel power from dB, then per frame ``min ||M p - mel||`` subject to ``p >= 0`` by
        accelerated projected gradient (FISTA, ``nnls_iter`` steps from the clipped
        pseudo-inverse); returns ``sqrt(p)``. More accurate than librosa's ``mel_to_stft``."""
        _check_bins(features, self.n_bins)
        mel = torch.pow(10.0, features / 10.0)
        b = torch.matmul(self.mel_basis.T, mel)  # (B, K, N)
        x = torch.matmul(self.mel_pinv, mel).clamp(min=0.0)
        z, t = x, 1.0
        for _ in range(self.nnls_iter):
            x_next = (z - (torch.matmul(self.gram, z) - b) / self.lipschitz).clamp(min=0.0)
            t_next = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
            z = x_next + ((t - 1.0) / t_next) * (x_next - x)
            x, t = x_next, t_next
        return x.sqrt()

    def frequencies(self) -> np.ndarray:
        mel = np.linspace(hz_to_mel_slaney(self.fmin), hz_to_mel_slaney(self.fmax), self.n_bins + 2)
        return mel_to_hz_slaney(mel[1:-1])  # the triangles' peaks


class RateKFrontend(Frontend):
    """Codec 2 700C rate-K vectors: the cepstrally smoothed log spectrum (dB) at ``rate_k``
    mel-spaced frequencies from ``fmin`` to ``fmax``; ``F = rate_k``. Not invertible."""

    def __init__(
        self,
        sample_rate: int,
        n_fft: int,
        hop_length: int,
        win_length: int,
        rate_k: int,
        fmin: float,
        fmax: float,
    ) -> None:
        super().__init__(sample_rate, n_fft, hop_length, win_length, rate_k)
        self.n_lifter = int(LIFTER_SECONDS * sample_rate)
        if not 1 <= self.n_lifter < n_fft // 2:
            raise VqkitError(f"ratek needs n_fft > {2 * self.n_lifter} at {sample_rate} Hz")
        self.freqs = ratek_frequencies(rate_k, fmin, fmax)
        bins = self.freqs * n_fft / sample_rate
        low = np.floor(bins).astype(np.int64)
        self.register_buffer("bin_low", torch.from_numpy(low), persistent=False)
        self.register_buffer("bin_frac", _f32(bins - low), persistent=False)
        lifter = np.zeros(n_fft)
        lifter[: self.n_lifter + 1] = 1.0
        lifter[n_fft - self.n_lifter :] = 1.0  # the real cepstrum is even
        self.register_buffer("lifter", _f32(lifter), persistent=False)

    def from_magnitude(self, magnitude: Tensor) -> Tensor:
        log_spec = 20.0 * torch.log10(magnitude.clamp(min=10.0 ** (DB_FLOOR / 20.0)))
        cepstrum = torch.fft.irfft(log_spec.transpose(1, 2), n=self.n_fft)  # (B, N, n_fft)
        smooth = torch.fft.rfft(cepstrum * self.lifter).real  # (B, N, K)
        low, frac = self.bin_low, self.bin_frac
        env = smooth[..., low] * (1.0 - frac) + smooth[..., low + 1] * frac  # (B, N, K)
        return env.transpose(1, 2).contiguous()

    def to_magnitude(self, features: Tensor) -> Tensor:
        raise VqkitError("ratek features have no inverse to a magnitude spectrum")

    def frequencies(self) -> np.ndarray:
        return self.freqs


def floor_db(kind: str) -> float:
    """The dB value of digital silence in features of ``kind``: the envelope's own floor
    (:data:`vqkit.audio.envelope.ENV_FLOOR_DB`), else :data:`vqkit.audio.stft.DB_FLOOR`."""
    return ENV_FLOOR_DB if kind == "envelope" else DB_FLOOR


def make_frontend(features: FeatureConfig, sample_rate: int) -> Frontend:
    """The front end that ``features`` describes, at ``sample_rate``. ``win_length`` 0 means
    ``n_fft``; for mel, ``fmax`` 0 means ``sample_rate / 2``; for ratek, ``fmin`` and ``fmax`` 0
    mean Codec 2's 200 and 3700 Hz."""
    if features.kind not in KINDS:
        raise VqkitError(
            f"features.kind={features.kind!r} has no audio front end; use one of {', '.join(KINDS)}"
        )
    win_length = features.win_length or features.n_fft
    stft_args = (sample_rate, features.n_fft, features.hop_length, win_length)
    if features.kind == "stft":
        return StftFrontend(*stft_args)
    if features.kind == "mel":
        fmax = features.fmax or sample_rate / 2
        return MelFrontend(*stft_args, features.n_mels, features.fmin, fmax)
    if features.kind == "envelope":
        return EnvelopeFrontend(*stft_args, features.rate_k, features.pitch)
    fmin, fmax = features.fmin or CODEC2_FMIN, features.fmax or CODEC2_FMAX
    if fmax >= sample_rate / 2:
        raise VqkitError(f"ratek fmax={fmax} Hz must be below sample_rate / 2 = {sample_rate / 2}")
    return RateKFrontend(*stft_args, features.rate_k, fmin, fmax)


@functools.cache
def row_frequencies(features: FeatureConfig, sample_rate: int) -> np.ndarray:
    """The frequency (Hz) of each row of the features ``features`` describes at ``sample_rate``
    (their front end's :meth:`frequencies`, built once per configuration): ``(F,)``."""
    return make_frontend(features, sample_rate).frequencies()


def ratek_frequencies(rate_k: int, fmin: float = CODEC2_FMIN, fmax: float = CODEC2_FMAX):
    """Codec 2's rate-K sample frequencies in Hz ``(rate_k,)``: uniform on a rounded mel scale."""
    if rate_k < 2 or not 0 <= fmin < fmax:
        raise VqkitError(f"ratek needs rate_k >= 2 and fmin < fmax; got {rate_k}, {fmin}, {fmax}")

    low, high = (math.floor(float(hz_to_mel_htk(f)) + 0.5) for f in (fmin, fmax))
    return mel_to_hz_htk(np.linspace(low, high, rate_k))


def _check_bins(features: Tensor, n_bins: int) -> None:
    if features.dim() != 3 or features.shape[1] != n_bins:
        raise ValueError(f"expected features (B, {n_bins}, N), got {tuple(features.shape)}")


def _f32(a: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
