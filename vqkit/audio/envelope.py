"""The analysis of the parametric speech model: pitch, voicing and the spectral envelope, in torch.

Analysis, one frame every ``hop_length`` samples, centred like the STFT frames of
:func:`vqkit.audio.stft.stft` (``N = 1 + T // hop_length``):

- F0 and voicing by :class:`vqkit.audio.pitch.PitchTracker` (``features.pitch``: YIN's first
  dip, or candidates tracked over a few frames), which looks a bounded number of frames either
  side, so chunked analysis equals whole-file analysis once chunks carry that context.
- The spectral envelope: the mean STFT power per bin in a band around each of ``K`` mel-spaced
  frequencies, the band as wide as the pitch spacing or the spacing of the points, whichever is
  wider (so harmonic ripple averages out, as in WORLD's CheapTrick), in dB. Unvoiced frames use a
  nominal pitch for the width. The envelope is floored at :data:`ENV_FLOOR_DB`, so that digital
  silence does not stretch the features' range (no audible effect: PESQ unchanged).

The synthesiser that inverts this model is :class:`vqkit.audio.synthesis.HarmonicNoise`; the
bitstream codes of pitch and voicing are in :mod:`vqkit.codec.side`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vqkit.audio.pitch import PitchTracker
from vqkit.audio.stft import Frontend, hz_to_mel_htk, mel_to_hz_htk
from vqkit.config import PitchMethod
from vqkit.errors import VqkitError

UNVOICED_F0 = 150.0  # Hz, the nominal pitch setting the envelope's band width in unvoiced frames
ENV_FMIN = 60.0  # Hz, the lowest envelope point (the top one is just under Nyquist)
ENV_FLOOR_DB = -70.0  # envelope floor: a few dB above the quantisation noise of 16-bit audio


def envelope_frequencies(n_points: int, sample_rate: int) -> np.ndarray:
    """``n_points`` mel-spaced frequencies (Hz) from :data:`ENV_FMIN` to 0.98 x Nyquist."""
    return mel_to_hz_htk(
        np.linspace(hz_to_mel_htk(ENV_FMIN), hz_to_mel_htk(0.49 * sample_rate), n_points)
    )


class EnvelopeFrontend(Frontend):
    """The front end of ``features.kind = "envelope"``: waveform ``(B, T)`` -> spectral envelope
    in dB ``(B, K, N)`` (``K = rate_k``); :meth:`analyse` also gives F0 and voicing, by the
    method ``pitch``."""

    def __init__(
        self,
        sample_rate: int,
        n_fft: int,
        hop_length: int,
        win_length: int,
        n_points: int,
        pitch: PitchMethod = "tracked",
    ) -> None:
        super().__init__(sample_rate, n_fft, hop_length, win_length, n_points)
        if n_points < 2 or 2 * hop_length > win_length:
            raise VqkitError(
                "the envelope front end needs rate_k >= 2 and win_length >= 2 x hop_length "
                "(the noise is synthesised by overlap-add with that window)"
            )
        self.tracker = PitchTracker(sample_rate, hop_length, pitch)
        freqs = envelope_frequencies(n_points, sample_rate)
        self.register_buffer("freqs", torch.tensor(freqs, dtype=torch.float32), persistent=False)
        spacing = torch.tensor(np.gradient(freqs), dtype=torch.float32)
        self.register_buffer("spacing", spacing, persistent=False)
        self.window_power = float(self.window.square().sum())

    def forward(self, wave: Tensor) -> Tensor:
        return self.analyse(wave)[0]

    def frequencies(self) -> np.ndarray:
        return envelope_frequencies(self.n_bins, self.sample_rate)  # float64, not the buffer's 32

    def analyse(self, wave: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Envelope dB ``(B, K, N)``, F0 in Hz ``(B, N)`` and voicing (0 or 1) ``(B, N)``."""
        if wave.dim() == 1:
            wave = wave[None]
        wave = wave.float()
        f0, voiced = self.pitch(wave)
        return self.envelope(wave, f0, voiced), f0, voiced

    def pitch(self, wave: Tensor) -> tuple[Tensor, Tensor]:
        """F0 (Hz) and voicing (0/1) ``(B, N)``; unvoiced frames keep a raw estimate."""
        return self.tracker(wave, self.n_frames(wave.shape[-1]))

    def envelope(self, wave: Tensor, f0: Tensor, voiced: Tensor) -> Tensor:
        """Mean power per bin (dB) around each envelope point ``(B, K, N)``."""
        spec = self.stft(wave)  # (B, n_fft // 2 + 1, N)
        power = spec.real.square() + spec.imag.square()
        cumulative = F.pad(power.cumsum(1), (0, 0, 1, 0)).transpose(1, 2)  # (B, N, bins + 1)
        pitch = torch.where(voiced > 0, f0, torch.full_like(f0, UNVOICED_F0))
        width = torch.maximum(pitch[..., None], self.spacing)  # (B, N, K) Hz
        bin_hz = self.sample_rate / self.n_fft
        n_bins = power.shape[1]
        low = ((self.freqs - width / 2) / bin_hz + 0.5).clamp(0, n_bins)
        high = ((self.freqs + width / 2) / bin_hz + 0.5).clamp(0, n_bins)
        total = _interp_last(cumulative, high) - _interp_last(cumulative, low)
        mean = total / (high - low).clamp(min=1e-3)
        return (10 * torch.log10(mean.clamp(min=10 ** (ENV_FLOOR_DB / 10)))).transpose(1, 2)


def _interp_last(values: Tensor, index: Tensor) -> Tensor:
    """``values (B, N, M)`` at fractional positions ``index (B, N, K)`` along the last axis."""
    lo = index.floor().long().clamp(0, values.shape[-1] - 2)
    frac = index - lo
    return torch.lerp(values.gather(-1, lo), values.gather(-1, lo + 1), frac)


def fill_unvoiced(f0: Tensor, voiced: Tensor, block: int = 0) -> Tensor:
    """F0 ``(B, N)`` with unvoiced frames replaced by linear interpolation between the voiced
    frames around them (held at the ends; :data:`UNVOICED_F0` where nothing is voiced). With
    ``block`` > 0 a frame looks ahead only inside its block of ``block`` frames (a code frame, for
    a decoder that waits for no later one): it takes the next voiced frame there, else the last
    voiced frame before it (:data:`UNVOICED_F0` before the first)."""
    out = torch.empty_like(f0)
    frames = np.arange(f0.shape[-1])
    for b in range(f0.shape[0]):
        mask = voiced[b].cpu().numpy() > 0
        values = f0[b].detach().cpu().numpy()
        if block:
            after = np.minimum.accumulate(np.where(mask, frames, len(frames))[::-1])[::-1]
            before = np.maximum.accumulate(np.where(mask, frames, -1))
            inside = (after < len(frames)) & (after // block == frames // block)
            source = np.where(inside, after, before)
            held = np.where(source >= 0, values[np.clip(source, 0, None)], UNVOICED_F0)
            out[b] = torch.from_numpy(held.astype(values.dtype))
            continue
        if not mask.any():
            out[b] = UNVOICED_F0
            continue
        log_f0 = np.interp(frames, frames[mask], np.log(values[mask]))
        out[b] = torch.from_numpy(np.exp(log_f0))
    return torch.where(voiced > 0, f0, out)


def interp(knots: Tensor, values: Tensor, queries: Tensor) -> Tensor:
    """Piecewise-linear interpolation: ``values (..., K)`` given at increasing ``knots (K,)``,
    read at ``queries (..., Q)`` (the same leading shape), held beyond the first and last knot."""
    if len(knots) == 1:
        return values.expand(*queries.shape).contiguous()
    index = torch.searchsorted(knots, queries.contiguous()).clamp(1, len(knots) - 1)
    lo, hi = knots[index - 1], knots[index]
    frac = ((queries - lo) / (hi - lo)).clamp(0, 1)
    return torch.lerp(values.gather(-1, index - 1), values.gather(-1, index), frac)
