"""The one STFT of vqkit, its inverse, the mel scales and fast Griffin-Lim, all in torch.

- :func:`stft`: centred frames (``N = 1 + T // hop_length``), zero padding at the edges
  (librosa's ``pad_mode="constant"``; torch's default is "reflect"), a periodic Hann window of
  ``win_length`` centred in ``n_fft``, no normalisation: the same numbers as ``librosa.stft``.
- :class:`Frontend`: the base of every front end (:mod:`vqkit.audio.frontends`), which holds
  the STFT settings and window.
- Two mel scales, each named for what it is: :func:`hz_to_mel_slaney` (librosa's default, used by
  the Slaney filter bank :func:`mel_filters`) and :func:`hz_to_mel_htk` (``2595 log10(1 + f/700)``,
  used by Codec 2's rate-K points and the parametric envelope).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from vqkit.errors import VqkitError

DB_FLOOR = -100.0  # dB value of silence: amplitude floor 1e-5, power floor 1e-10
MAX_N_FFT = 65536  # over a second at 48 kHz; a larger value is a damaged config, not a choice


def hann_window(win_length: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The periodic Hann window ``(win_length,)`` of every STFT in vqkit."""
    return torch.hann_window(win_length, periodic=True, dtype=dtype)


def stft(
    wave: Tensor,
    n_fft: int,
    hop_length: int,
    win_length: int | None = None,
    window: Tensor | None = None,
    *,
    pad_mode: str = "constant",
) -> Tensor:
    """Complex STFT ``(B, T)`` or ``(T,)`` -> ``(B, n_fft // 2 + 1, N)`` (or ``(n_fft // 2 + 1,
    N)``), ``N = 1 + T // hop_length``. ``window`` defaults to :func:`hann_window` in the wave's
    dtype; ``pad_mode="reflect"`` only where a metric's definition asks for it."""
    win_length = win_length or n_fft
    if window is None:
        window = hann_window(win_length, wave.dtype).to(wave.device)
    return torch.stft(
        wave,
        n_fft,
        hop_length=hop_length,
        win_length=win_length,
        window=window,
        center=True,
        pad_mode=pad_mode,
        return_complex=True,
    )


def istft(
    spec: Tensor,
    n_fft: int,
    hop_length: int,
    win_length: int | None = None,
    window: Tensor | None = None,
    *,
    length: int,
) -> Tensor:
    """The inverse of :func:`stft`: ``(B, n_fft // 2 + 1, N)`` -> ``(B, length)``."""
    win_length = win_length or n_fft
    if window is None:
        window = hann_window(win_length, spec.real.dtype).to(spec.device)
    return torch.istft(
        spec,
        n_fft,
        hop_length=hop_length,
        win_length=win_length,
        window=window,
        center=True,
        length=length,
    )


def hz_to_mel_slaney(f: np.ndarray | float) -> np.ndarray:
    """Slaney's mel scale (librosa's ``htk=False``): linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    linear = f / (200.0 / 3)
    log = 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (np.log(6.4) / 27.0)
    return np.where(f >= 1000.0, log, linear)


def mel_to_hz_slaney(m: np.ndarray) -> np.ndarray:
    """The inverse of :func:`hz_to_mel_slaney`."""
    linear = m * (200.0 / 3)
    log = 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0))
    return np.where(m >= 15.0, log, linear)


def hz_to_mel_htk(f):
    """The HTK mel scale ``2595 log10(1 + f / 700)`` of floats, arrays or tensors."""
    if isinstance(f, Tensor):
        return 2595.0 * torch.log10(1.0 + f / 700.0)
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def mel_to_hz_htk(m: np.ndarray | float) -> np.ndarray:
    """The inverse of :func:`hz_to_mel_htk`."""
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


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
    mel_f = mel_to_hz_slaney(
        np.linspace(hz_to_mel_slaney(fmin), hz_to_mel_slaney(fmax), n_mels + 2)
    )
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
    angles: Tensor | None = None,
) -> Tensor:
    """Fast Griffin-Lim (Perraudin et al. 2013, librosa's update), batched.

    ``magnitude`` ``(B, n_fft // 2 + 1, N)`` -> waveform ``(B, T)``, ``T = length`` or
    ``(N - 1) * hop_length``. Starts from ``angles`` (unit complex, the magnitude's shape) or
    else seeded random phases, the same for every item, so
    ``griffin_lim(m)[i] == griffin_lim(m[i : i + 1])[0]``; ``n_iter >= 1`` always.
    """
    if magnitude.dim() != 3 or magnitude.shape[1] != n_fft // 2 + 1:
        raise ValueError(
            f"expected magnitude (B, {n_fft // 2 + 1}, N) for n_fft={n_fft}, "
            f"got {tuple(magnitude.shape)}"
        )
    if n_iter < 1:
        raise ValueError(f"n_iter must be >= 1 (0 would be a zero-phase inverse), got {n_iter}")
    if angles is None:
        generator = torch.Generator(device=magnitude.device).manual_seed(seed)
        # One (K, N) draw shared by the batch, so an item's result does not depend on its batch.
        shape = (1, *magnitude.shape[1:])
        phase = torch.rand(
            shape, generator=generator, device=magnitude.device, dtype=magnitude.dtype
        )
        angles = torch.polar(torch.ones_like(phase), 2.0 * math.pi * phase).expand_as(magnitude)
    win_length = win_length or n_fft
    window = hann_window(win_length, magnitude.dtype).to(magnitude.device)
    length = length or (magnitude.shape[-1] - 1) * hop_length
    eps = torch.finfo(magnitude.dtype).tiny
    rebuilt = torch.zeros_like(angles)
    for _ in range(n_iter):
        wave = istft(magnitude * angles, n_fft, hop_length, win_length, window, length=length)
        previous, rebuilt = rebuilt, stft(wave, n_fft, hop_length, win_length, window)
        angles = rebuilt - (momentum / (1.0 + momentum)) * previous
        angles = angles / (angles.abs() + eps)
    return istft(magnitude * angles, n_fft, hop_length, win_length, window, length=length)


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
        window = hann_window(win_length)
        self.register_buffer("window", window, persistent=False)

    def n_frames(self, n_samples: int) -> int:
        """Number of centered frames for ``n_samples`` samples."""
        return 1 + n_samples // self.hop_length

    def stft(self, wave: Tensor) -> Tensor:
        """Complex STFT ``(B, T) -> (B, n_fft // 2 + 1, N)``, the same numbers as librosa's."""
        return stft(wave, self.n_fft, self.hop_length, self.win_length, self.window)

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

    def frequencies(self) -> np.ndarray:
        """The frequency (Hz) each feature row stands for ``(F,)``: a bin's or a filter's centre."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (
            f"sample_rate={self.sample_rate}, n_fft={self.n_fft}, hop_length={self.hop_length}, "
            f"win_length={self.win_length}, n_bins={self.n_bins}"
        )
