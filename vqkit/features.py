"""Spectral front ends, their inverses, normalisers and fast Griffin-Lim, all in torch.

One definition of each feature, pinned to librosa by tests (``tests/test_features.py``):

- STFT: centered frames (``N = 1 + T // hop_length``), zero padding at the edges (librosa's
  ``pad_mode="constant"``; torch's default is "reflect"), periodic Hann window of ``win_length``
  centred in ``n_fft``, no normalisation: the same numbers as ``librosa.stft``.
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

Both dB floors are -100 dB (:data:`DB_FLOOR`): digital silence is -100 dB in every kind.
The normalisers (:mod:`vqkit.normalise`) are re-exported here.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from vqkit.config import FeatureConfig
from vqkit.errors import VqkitError
from vqkit.normalise import (
    NORMALISERS,
    MeanStd,
    Normaliser,
    minmax_denormalise,
    minmax_normalise,
)

__all__ = [
    "DB_FLOOR",
    "KINDS",
    "NORMALISERS",
    "Frontend",
    "MeanStd",
    "Normaliser",
    "griffin_lim",
    "make_frontend",
    "mel_filters",
    "minmax_denormalise",
    "minmax_normalise",
    "ratek_frequencies",
]

DB_FLOOR = -100.0  # dB value of silence: amplitude floor 1e-5, power floor 1e-10
KINDS = ("stft", "mel", "ratek", "envelope")
CODEC2_FMIN, CODEC2_FMAX = 200.0, 3700.0  # rate-K sampling range of Codec 2 700C
LIFTER_SECONDS = 0.002  # cepstral lifter cutoff for the rate-K envelope
MAX_N_FFT = 65536  # over a second at 48 kHz; a larger value is a damaged config, not a choice


class Frontend(torch.nn.Module):
    """Waveform ``(B, T)`` or ``(T,)`` to features in dB ``(B, F, N)``; ``F = n_bins``.

    Stateless apart from buffers derived from the settings (window, mel basis), which are not
    saved in state dicts: the config rebuilds them.
    """

    def __init__(
        self, sample_rate: int, n_fft: int, hop_length: int, win_length: int, n_bins: int
    ) -> None:
        super().__init__()
        if not 2 <= n_fft <= MAX_N_FFT or hop_length < 1 or not 1 <= win_length <= n_fft:
            raise VqkitError(
                f"STFT needs 2 <= n_fft <= {MAX_N_FFT}, hop_length >= 1 and 1 <= win_length <= "
                f"n_fft; got n_fft={n_fft}, hop_length={hop_length}, win_length={win_length}"
            )
        self.sample_rate, self.n_fft, self.hop_length = sample_rate, n_fft, hop_length
        self.win_length, self.n_bins = win_length, n_bins
        window = torch.hann_window(win_length, periodic=True, dtype=torch.float32)
        self.register_buffer("window", window, persistent=False)

    def n_frames(self, n_samples: int) -> int:
        """Number of centered frames for ``n_samples`` samples."""
        return 1 + n_samples // self.hop_length

    def stft(self, wave: Tensor) -> Tensor:
        """Complex STFT ``(B, T) -> (B, n_fft // 2 + 1, N)``, the same numbers as librosa's."""
        return _stft(wave, self.n_fft, self.hop_length, self.win_length, self.window)

    def forward(self, wave: Tensor) -> Tensor:
        """``(B, T)`` or ``(T,)`` waveform -> ``(B, F, N)`` features in dB."""
        if wave.dim() == 1:
            wave = wave[None]
        if wave.dim() != 2:
            raise ValueError(f"expected a waveform (B, T) or (T,), got shape {tuple(wave.shape)}")
        return self.from_magnitude(self.stft(wave.to(self.window.dtype)).abs())

    def from_magnitude(self, magnitude: Tensor) -> Tensor:
        """Linear STFT magnitude ``(B, n_fft // 2 + 1, N)`` -> features ``(B, F, N)`` in dB."""
        raise NotImplementedError

    def to_magnitude(self, features: Tensor) -> Tensor:
        """Features ``(B, F, N)`` in dB -> linear STFT magnitude ``(B, n_fft // 2 + 1, N)``."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (
            f"sample_rate={self.sample_rate}, n_fft={self.n_fft}, hop_length={self.hop_length}, "
            f"win_length={self.win_length}, n_bins={self.n_bins}"
        )


class StftFrontend(Frontend):
    """Log-magnitude STFT in dB; ``F = n_fft // 2 + 1`` (the Nyquist bin is kept)."""

    def __init__(self, sample_rate: int, n_fft: int, hop_length: int, win_length: int) -> None:
        super().__init__(sample_rate, n_fft, hop_length, win_length, n_fft // 2 + 1)

    def from_magnitude(self, magnitude: Tensor) -> Tensor:
        return 20.0 * torch.log10(magnitude.clamp(min=10.0 ** (DB_FLOOR / 20.0)))

    def to_magnitude(self, features: Tensor) -> Tensor:
        _check_bins(features, self.n_bins)
        return torch.pow(10.0, features / 20.0)


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
        from vqkit.parametric import EnvelopeFrontend  # it builds on this module

        return EnvelopeFrontend(*stft_args, features.rate_k)
    fmin, fmax = features.fmin or CODEC2_FMIN, features.fmax or CODEC2_FMAX
    if fmax >= sample_rate / 2:
        raise VqkitError(f"ratek fmax={fmax} Hz must be below sample_rate / 2 = {sample_rate / 2}")
    return RateKFrontend(*stft_args, features.rate_k, fmin, fmax)


def mel_filters(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """Slaney-style mel filter bank ``(n_mels, n_fft // 2 + 1)``, equal to
    ``librosa.filters.mel(..., htk=False, norm="slaney")`` (float32). Written out here so that
    worker processes need not import librosa."""
    if not 0 <= fmin < fmax <= sample_rate / 2 or n_mels < 1:
        raise VqkitError(
            f"mel needs n_mels >= 1 and 0 <= fmin < fmax <= sample_rate / 2; got n_mels={n_mels}, "
            f"fmin={fmin}, fmax={fmax}, sample_rate={sample_rate}"
        )
    fft_freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2:] - mel_f[:-2]))[:, None]
    if not (weights.max(axis=1) > 0).all():
        raise VqkitError(
            f"n_mels={n_mels} is too many for n_fft={n_fft} at {sample_rate} Hz: some mel bands "
            "are empty; use fewer n_mels or a larger n_fft"
        )
    return weights.astype(np.float32)


def _hz_to_mel(f: np.ndarray | float) -> np.ndarray:
    f = np.asarray(f, dtype=np.float64)
    linear = f / (200.0 / 3)
    log = 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (np.log(6.4) / 27.0)
    return np.where(f >= 1000.0, log, linear)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    linear = m * (200.0 / 3)
    log = 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0))
    return np.where(m >= 15.0, log, linear)


def ratek_frequencies(rate_k: int, fmin: float = CODEC2_FMIN, fmax: float = CODEC2_FMAX):
    """Codec 2's rate-K sample frequencies in Hz ``(rate_k,)``: uniform on a rounded mel scale."""
    if rate_k < 2 or not 0 <= fmin < fmax:
        raise VqkitError(f"ratek needs rate_k >= 2 and fmin < fmax; got {rate_k}, {fmin}, {fmax}")

    def ftomel(f: float) -> float:
        return math.floor(2595.0 * math.log10(1.0 + f / 700.0) + 0.5)

    mels = np.linspace(ftomel(fmin), ftomel(fmax), rate_k)
    return 700.0 * (10.0 ** (mels / 2595.0) - 1.0)


def griffin_lim(
    magnitude: Tensor,
    *,
    n_fft: int,
    hop_length: int,
    win_length: int | None = None,
    n_iter: int = 32,
    momentum: float = 0.99,
    length: int | None = None,
    seed: int = 0,
) -> Tensor:
    """Fast Griffin-Lim (Perraudin et al. 2013, librosa's update), batched.

    ``magnitude`` ``(B, n_fft // 2 + 1, N)`` -> waveform ``(B, T)``, ``T = length`` or
    ``(N - 1) * hop_length``. Starts from seeded random phases, the same for every item, so
    ``griffin_lim(m)[i] == griffin_lim(m[i : i + 1])[0]``; ``n_iter >= 1`` always.
    """
    if magnitude.dim() != 3 or magnitude.shape[1] != n_fft // 2 + 1:
        raise ValueError(
            f"expected magnitude (B, {n_fft // 2 + 1}, N) for n_fft={n_fft}, "
            f"got {tuple(magnitude.shape)}"
        )
    if n_iter < 1:
        raise ValueError(f"n_iter must be >= 1 (0 would be a zero-phase inverse), got {n_iter}")
    generator = torch.Generator(device=magnitude.device).manual_seed(seed)
    # One (K, N) draw shared by the batch, so an item's result does not depend on its batch.
    shape = (1, *magnitude.shape[1:])
    phase = torch.rand(shape, generator=generator, device=magnitude.device, dtype=magnitude.dtype)
    angles = torch.polar(torch.ones_like(phase), 2.0 * math.pi * phase).expand_as(magnitude)
    return _fast_griffin_lim(
        magnitude, angles, n_fft, hop_length, win_length or n_fft, n_iter, momentum, length
    )


def _fast_griffin_lim(
    magnitude: Tensor,
    angles: Tensor,
    n_fft: int,
    hop_length: int,
    win_length: int,
    n_iter: int,
    momentum: float,
    length: int | None,
) -> Tensor:
    window = torch.hann_window(win_length, periodic=True, dtype=magnitude.dtype)
    window = window.to(magnitude.device)
    length = length or (magnitude.shape[-1] - 1) * hop_length
    eps = torch.finfo(magnitude.dtype).tiny
    rebuilt = torch.zeros_like(angles)
    for _ in range(n_iter):
        wave = _istft(magnitude * angles, n_fft, hop_length, win_length, window, length)
        previous, rebuilt = rebuilt, _stft(wave, n_fft, hop_length, win_length, window)
        angles = rebuilt - (momentum / (1.0 + momentum)) * previous
        angles = angles / (angles.abs() + eps)
    return _istft(magnitude * angles, n_fft, hop_length, win_length, window, length)


def _stft(wave: Tensor, n_fft: int, hop_length: int, win_length: int, window: Tensor) -> Tensor:
    return torch.stft(
        wave,
        n_fft,
        hop_length=hop_length,
        win_length=win_length,
        window=window,
        center=True,
        pad_mode="constant",
        return_complex=True,
    )


def _istft(
    spec: Tensor, n_fft: int, hop_length: int, win_length: int, window: Tensor, length: int
) -> Tensor:
    return torch.istft(
        spec,
        n_fft,
        hop_length=hop_length,
        win_length=win_length,
        window=window,
        center=True,
        length=length,
    )


def _check_bins(features: Tensor, n_bins: int) -> None:
    if features.dim() != 3 or features.shape[1] != n_bins:
        raise ValueError(f"expected features (B, {n_bins}, N), got {tuple(features.shape)}")


def _f32(a: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
