"""The analysis of the parametric speech model: pitch, voicing and the spectral envelope, in torch.

Analysis, one frame every ``hop_length`` samples, centred like the STFT frames of
:func:`vqkit.audio.stft.stft` (``N = 1 + T // hop_length``):

- F0 and voicing by YIN (de Cheveigne and Kawahara, 2002): the cumulative mean normalised
  difference function, the first dip under :data:`YIN_THRESHOLD` (its lowest point), parabolic
  interpolation. A frame is voiced when that dip is deep enough (the aperiodicity is low) and the
  frame is not silent; a 3-frame median then removes isolated decisions and octave jumps. Every
  step looks at most one frame either side, so chunked analysis equals whole-file analysis once
  chunks overlap by a frame.
- The spectral envelope: the mean STFT power per bin in a band around each of ``K`` mel-spaced
  frequencies, the band as wide as the pitch spacing or the spacing of the points, whichever is
  wider (so harmonic ripple averages out, as in WORLD's CheapTrick), in dB. Unvoiced frames use a
  nominal pitch for the width. The envelope is floored at :data:`ENV_FLOOR_DB`, so that digital
  silence does not stretch the features' range (no audible effect: PESQ unchanged).

The synthesiser that inverts this model is :class:`vqkit.audio.synthesis.HarmonicNoise`; the
bitstream codes of pitch and voicing are in :mod:`vqkit.codec.side`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vqkit.audio.stft import Frontend, hz_to_mel_htk, mel_to_hz_htk
from vqkit.errors import VqkitError

F0_MIN, F0_MAX = 50.0, 500.0  # Hz, the pitch range tracked and coded
YIN_THRESHOLD = 0.15  # first CMNDF dip under this is the period
VOICED_APERIODICITY = 0.42  # a frame is voiced when its CMNDF dip is below this
SILENCE_DB = -60.0  # frames quieter than this (RMS, dBFS) are unvoiced
YIN_WINDOW = 0.025  # seconds of signal integrated per lag
UNVOICED_F0 = 150.0  # Hz, the nominal pitch setting the envelope's band width in unvoiced frames
ENV_FMIN = 60.0  # Hz, the lowest envelope point (the top one is just under Nyquist)
ENV_FLOOR_DB = -70.0  # envelope floor: a few dB above the quantisation noise of 16-bit audio
# Frames analysed by YIN at a time: its work arrays are frames x FFT bins, ~130 MB for a whole
# codec chunk (20 s) at once; blocks keep that to a few MB whatever the chunk, the same result.
YIN_BLOCK_FRAMES = 256


def envelope_frequencies(n_points: int, sample_rate: int) -> np.ndarray:
    """``n_points`` mel-spaced frequencies (Hz) from :data:`ENV_FMIN` to 0.98 x Nyquist."""
    return mel_to_hz_htk(
        np.linspace(hz_to_mel_htk(ENV_FMIN), hz_to_mel_htk(0.49 * sample_rate), n_points)
    )


class EnvelopeFrontend(Frontend):
    """The front end of ``features.kind = "envelope"``: waveform ``(B, T)`` -> spectral envelope
    in dB ``(B, K, N)`` (``K = rate_k``); :meth:`analyse` also gives F0 and voicing."""

    def __init__(
        self, sample_rate: int, n_fft: int, hop_length: int, win_length: int, n_points: int
    ) -> None:
        super().__init__(sample_rate, n_fft, hop_length, win_length, n_points)
        if n_points < 2 or 2 * hop_length > win_length:
            raise VqkitError(
                "the envelope front end needs rate_k >= 2 and win_length >= 2 x hop_length "
                "(the noise is synthesised by overlap-add with that window)"
            )
        self.max_lag = math.ceil(sample_rate / F0_MIN)
        self.min_lag = math.floor(sample_rate / F0_MAX)
        self.yin_window = round(YIN_WINDOW * sample_rate)
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
        """YIN F0 (Hz) and voicing (0/1) ``(B, N)``; unvoiced frames keep their raw estimate."""
        size, hop = self.yin_window + self.max_lag, self.hop_length
        n = self.n_frames(wave.shape[-1])
        padded = F.pad(wave, (size // 2, size // 2 + hop))
        frames = padded.unfold(-1, size, hop)[:, :n]  # (B, N, size) view, frame i at i * hop
        blocks = range(0, n, YIN_BLOCK_FRAMES)
        f0, voiced = zip(
            *(self._yin(frames[:, i : i + YIN_BLOCK_FRAMES]) for i in blocks), strict=True
        )
        f0 = _median3(torch.cat(f0, -1).clamp(F0_MIN, F0_MAX))
        return f0, _median3(torch.cat(voiced, -1).float())

    def _yin(self, frames: Tensor) -> tuple[Tensor, Tensor]:
        """Raw YIN F0 (Hz) and voicing (bool) ``(B, N)`` of frames ``(B, N, window + max_lag)``."""
        w, max_lag = self.yin_window, self.max_lag
        size = w + max_lag
        frames = frames - frames.mean(-1, keepdim=True)
        n_fft = 1 << (2 * size - 1).bit_length()
        spec = torch.fft.rfft(frames, n_fft)
        head = torch.fft.rfft(frames[..., :w], n_fft)
        corr = torch.fft.irfft(spec * head.conj(), n_fft)[..., : max_lag + 1]  # r(tau)
        energy = F.pad(frames.square().cumsum(-1), (1, 0))  # (B, N, size + 1)
        lags = torch.arange(max_lag + 1)
        shifted = energy[..., lags + w] - energy[..., lags]  # energy of x[tau : tau + w]
        diff = (energy[..., w : w + 1] + shifted - 2 * corr).clamp(min=0)
        cumulative = diff[..., 1:].cumsum(-1) / torch.arange(1, max_lag + 1)
        cmndf = torch.cat(
            [torch.ones_like(diff[..., :1]), diff[..., 1:] / cumulative.clamp(min=1e-12)], -1
        )
        cmndf[..., : self.min_lag] = 2.0
        below = cmndf < YIN_THRESHOLD
        after = lags >= below.float().argmax(-1, keepdim=True)  # from the first lag under it
        region = after & ((~below & after).cumsum(-1) == 0)  # the run of lags under the threshold
        tau = torch.where(  # the lowest point of that run, or the global minimum if none
            below.any(-1), cmndf.masked_fill(~region, 3.0).argmin(-1), cmndf.argmin(-1)
        ).clamp(1, max_lag - 1)
        c = cmndf.gather(-1, torch.stack([tau - 1, tau, tau + 1], -1))
        curve = c[..., 0] - 2 * c[..., 1] + c[..., 2]
        offset = torch.where(curve > 0, 0.5 * (c[..., 0] - c[..., 2]) / curve.clamp(min=1e-9), 0)
        f0 = self.sample_rate / (tau + offset.clamp(-1, 1))
        level = 10 * torch.log10(frames[..., :w].square().mean(-1).clamp(min=1e-10))
        return f0, (c[..., 1] < VOICED_APERIODICITY) & (level > SILENCE_DB)

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


def _median3(x: Tensor) -> Tensor:
    """Median over each frame and its neighbours ``(B, N)`` (edges repeat)."""
    padded = F.pad(x[:, None], (1, 1), mode="replicate")[:, 0]
    return padded.unfold(-1, 3, 1).median(-1).values


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
