"""The parametric speech model: pitch, voicing and spectral envelope, and the harmonic-plus-noise
synthesiser that turns them back into a waveform. All in torch; the synthesiser is differentiable.

Analysis, one frame every ``hop_length`` samples, centred like the STFT frames of
:mod:`vqkit.features` (``N = 1 + T // hop_length``):

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

Synthesis (:class:`HarmonicNoise`): the envelope is interpolated (in dB, on the mel scale) at each
harmonic of F0 and at every STFT bin. Voiced frames are a bank of harmonic oscillators whose phase
is the running integral of F0 and whose amplitudes give each harmonic the power the envelope
measured around it; all frames also get white noise shaped by the envelope in the STFT domain,
scaled by ``noise_voiced`` in voiced frames and 1 in unvoiced ones. The calibration makes a
sinusoid or a white noise come back at the level it was analysed at.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vqkit.errors import VqkitError
from vqkit.features import Frontend

F0_MIN, F0_MAX = 50.0, 500.0  # Hz, the pitch range tracked and coded
YIN_THRESHOLD = 0.15  # first CMNDF dip under this is the period
VOICED_APERIODICITY = 0.42  # a frame is voiced when its CMNDF dip is below this
SILENCE_DB = -60.0  # frames quieter than this (RMS, dBFS) are unvoiced
YIN_WINDOW = 0.025  # seconds of signal integrated per lag
UNVOICED_F0 = 150.0  # Hz, the nominal pitch setting the envelope's band width in unvoiced frames
ENV_FMIN = 60.0  # Hz, the lowest envelope point (the top one is just under Nyquist)
ENV_FLOOR_DB = -70.0  # envelope floor: a few dB above the quantisation noise of 16-bit audio


def envelope_frequencies(n_points: int, sample_rate: int) -> np.ndarray:
    """``n_points`` mel-spaced frequencies (Hz) from :data:`ENV_FMIN` to 0.98 x Nyquist."""
    mel = np.linspace(_mel(ENV_FMIN), _mel(0.49 * sample_rate), n_points)
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def _mel(f: float) -> float:
    return 2595.0 * math.log10(1.0 + f / 700.0)


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

    def analyse(self, wave: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Envelope dB ``(B, K, N)``, F0 in Hz ``(B, N)`` and voicing (0 or 1) ``(B, N)``."""
        if wave.dim() == 1:
            wave = wave[None]
        wave = wave.float()
        f0, voiced = self.pitch(wave)
        return self.envelope(wave, f0, voiced), f0, voiced

    def pitch(self, wave: Tensor) -> tuple[Tensor, Tensor]:
        """YIN F0 (Hz) and voicing (0/1) ``(B, N)``; unvoiced frames keep their raw estimate."""
        w, max_lag, hop = self.yin_window, self.max_lag, self.hop_length
        size = w + max_lag
        n = self.n_frames(wave.shape[-1])
        padded = F.pad(wave, (size // 2, size // 2 + hop))
        frames = padded.unfold(-1, size, hop)[:, :n]  # (B, N, size), frame i centred on i * hop
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
        voiced = (c[..., 1] < VOICED_APERIODICITY) & (level > SILENCE_DB)
        f0 = _median3(f0.clamp(F0_MIN, F0_MAX))
        return f0, _median3(voiced.float())

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


class HarmonicNoise(torch.nn.Module):
    """The synthesiser of ``codec.synthesis = "harmonic"``: features ``(B, K + 2, N)`` (the
    envelope in dB, then F0 in Hz and voicing as the last two rows) -> waveform ``(B, T)``.

    Differentiable in the envelope; frame ``i`` is centred on sample ``i * hop_length``. The noise
    is seeded, so the same features give the same waveform. Called window by window on a stream
    (:func:`vqkit.synthesis.synthesise_chunked`), it carries the harmonics' phase from one window
    into the next, so overlapping windows agree where they overlap.
    """

    def __init__(self, frontend: EnvelopeFrontend, noise_voiced: float, seed: int = 0) -> None:
        super().__init__()
        if not 0 <= noise_voiced <= 1:
            raise VqkitError(f"codec.noise_voiced must be in 0..1, got {noise_voiced}")
        self.frontend, self.noise_voiced, self.seed = frontend, noise_voiced, seed
        self._phases: tuple[int, Tensor] | None = None  # the last window's first frame, phases
        self.sample_rate, self.hop_length = frontend.sample_rate, frontend.hop_length
        mel_points = _mel_t(frontend.freqs)
        self.register_buffer("mel_points", mel_points, persistent=False)
        bins = torch.arange(frontend.n_fft // 2 + 1) * self.sample_rate / frontend.n_fft
        self.register_buffer("bin_mel", _mel_t(bins), persistent=False)

    def forward(self, features: Tensor, length: int, first_frame: int = 0) -> Tensor:
        env_db, f0, voiced = features[:, :-2], features[:, -2], features[:, -1]
        start = torch.zeros_like(f0[:, :1])
        if first_frame and self._phases is not None:  # continue the previous window's phase
            offset, phases = self._phases
            if offset <= first_frame < offset + phases.shape[-1]:
                start = phases[:, first_frame - offset, None]
        wave, phases = self._synthesise(env_db, f0, voiced, length, start, first_frame)
        self._phases = first_frame, phases
        return wave

    def synthesise(self, env_db: Tensor, f0: Tensor, voiced: Tensor, length: int) -> Tensor:
        """Envelope dB ``(B, K, N)``, F0 Hz ``(B, N)``, voicing ``(B, N)`` -> ``(B, length)``."""
        return self._synthesise(env_db, f0, voiced, length, torch.zeros_like(f0[:, :1]), 0)[0]

    def _synthesise(
        self, env_db: Tensor, f0: Tensor, voiced: Tensor, length: int, start: Tensor, seed: int
    ) -> tuple[Tensor, Tensor]:
        """The waveform, and the fundamental's phase at each frame ``(B, N)``, from the phase
        ``start`` ``(B, 1)`` at the first sample; the noise is seeded by ``seed``."""
        harmonics, phases = self.harmonics(env_db, f0, voiced, length, start)
        return harmonics + self.noise(env_db, voiced, length, seed), phases

    def _at(self, env_db: Tensor, mel: Tensor) -> Tensor:
        """The envelope ``(B, K, N)`` in dB at mel positions ``(B, N, H)``: ``(B, N, H)``."""
        return _interp(self.mel_points, env_db.transpose(1, 2), mel)

    def harmonics(
        self, env_db: Tensor, f0: Tensor, voiced: Tensor, length: int, start: Tensor
    ) -> tuple[Tensor, Tensor]:
        sr, hop = self.sample_rate, self.hop_length
        f0_t = _upsample(f0[:, None], hop, length)[:, 0]  # (B, T)
        phase = start.double() + 2 * math.pi * torch.cumsum(f0_t.double() / sr, -1)
        phase = torch.cat([start.double(), phase[:, :-1]], -1)  # the phase at each sample
        phase = torch.remainder(phase, 2 * math.pi).float()
        phases = phase[:, ::hop]  # at each frame
        if not (voiced > 0).any():
            return env_db.new_zeros(env_db.shape[0], length), phases
        n_harm = int(0.49 * sr / float(f0.detach()[voiced > 0].min().clamp(min=F0_MIN)))
        k = torch.arange(1, n_harm + 1, dtype=env_db.dtype)
        freqs = f0[..., None] * k  # (B, N, H)
        audible = freqs < 0.5 * sr * 0.98
        power_db = self._at(env_db, _mel_t(freqs.clamp(max=sr / 2)))
        # mean power per bin D makes a harmonic of amplitude a with a^2 = 4 D f0 / (sr sum w^2)
        amp = (
            torch.sqrt(
                4
                * torch.pow(10.0, power_db / 10)
                * f0[..., None]
                / (sr * self.frontend.window_power)
            )
            * audible
            * voiced[..., None]
        )
        amp = _upsample(amp.transpose(1, 2), hop, length)  # (B, H, T)
        # the harmonics' phases are multiples of the fundamental's, wrapped in double precision
        waves = torch.sin(phase[:, None] * k[:, None])  # (B, H, T); k x phase < 2000 rad
        return (amp * waves).sum(1), phases

    def noise(self, env_db: Tensor, voiced: Tensor, length: int, seed: int = 0) -> Tensor:
        a = self.frontend
        generator = torch.Generator().manual_seed(self.seed + seed)
        white = torch.randn(env_db.shape[0], length, generator=generator, dtype=env_db.dtype)
        spec = torch.stft(
            white,
            a.n_fft,
            a.hop_length,
            a.win_length,
            a.window,
            center=True,
            pad_mode="constant",
            return_complex=True,
        )  # E|X|^2 = sum w^2 for unit variance
        n = min(spec.shape[-1], env_db.shape[-1])
        mel = self.bin_mel.expand(env_db.shape[0], n, -1)
        power_db = self._at(env_db[..., :n], mel)  # (B, N, bins)
        gain = torch.where(voiced[..., :n] > 0, self.noise_voiced, 1.0)[..., None]
        scale = gain * torch.sqrt(torch.pow(10.0, power_db / 10) / a.window_power)
        spec = spec[..., :n] * scale.transpose(1, 2)
        return torch.istft(
            spec, a.n_fft, a.hop_length, a.win_length, a.window, center=True, length=length
        )


def _mel_t(f: Tensor) -> Tensor:
    return 2595.0 * torch.log10(1.0 + f / 700.0)


def _median3(x: Tensor) -> Tensor:
    """Median over each frame and its neighbours ``(B, N)`` (edges repeat)."""
    padded = F.pad(x[:, None], (1, 1), mode="replicate")[:, 0]
    return padded.unfold(-1, 3, 1).median(-1).values


def _interp_last(values: Tensor, index: Tensor) -> Tensor:
    """``values (B, N, M)`` at fractional positions ``index (B, N, K)`` along the last axis."""
    lo = index.floor().long().clamp(0, values.shape[-1] - 2)
    frac = index - lo
    return torch.lerp(values.gather(-1, lo), values.gather(-1, lo + 1), frac)


def _upsample(x: Tensor, hop: int, length: int) -> Tensor:
    """Frame values ``(B, C, N)`` (frame i at sample i * hop) linearly to samples ``(B, C, T)``,
    the last frame held."""
    n = x.shape[-1]
    if n > 1:
        x = F.interpolate(x, size=(n - 1) * hop + 1, mode="linear", align_corners=True)
    if x.shape[-1] < length:
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], length - x.shape[-1])], -1)
    return x[..., :length]


def fill_unvoiced(f0: Tensor, voiced: Tensor) -> Tensor:
    """F0 ``(B, N)`` with unvoiced frames replaced by linear interpolation between the voiced
    frames around them (held at the ends; :data:`UNVOICED_F0` where nothing is voiced)."""
    out = torch.empty_like(f0)
    frames = np.arange(f0.shape[-1])
    for b in range(f0.shape[0]):
        mask = voiced[b].cpu().numpy() > 0
        if not mask.any():
            out[b] = UNVOICED_F0
            continue
        log_f0 = np.interp(frames, frames[mask], np.log(f0[b].detach().cpu().numpy()[mask]))
        out[b] = torch.from_numpy(np.exp(log_f0))
    return torch.where(voiced > 0, f0, out)


PITCH_BITS = 7  # a log-F0 code on a uniform grid from F0_MIN to F0_MAX
PITCH_SHARE = 2  # frames per log-F0 code (20 ms at a 10 ms hop)


def side_codebooks(factor: int) -> tuple[int, ...]:
    """Codebook sizes of the pitch and voicing codes of a code frame of ``factor`` frames: a
    log-F0 code for every :data:`PITCH_SHARE` frames, then one voicing bit per frame in one code."""
    if factor % PITCH_SHARE or not 1 <= factor <= 16:
        raise VqkitError(
            f"the parametric codec needs model.downsample in 2..16 divisible by {PITCH_SHARE}, "
            f"got {factor}"
        )
    return (2**PITCH_BITS,) * (factor // PITCH_SHARE) + (2**factor,)


def pitch_codes(f0: Tensor, voiced: Tensor, factor: int) -> Tensor:
    """Pitch and voicing codes ``(B, C, N')`` of F0 (Hz) and voicing ``(B, N)``
    for code frames of ``factor`` frames (see :func:`side_codebooks`). A log-F0 code is the mean
    log-F0 of the voiced frames in its share (0 when none is voiced, as the decoder ignores it);
    the voicing bits go first frame first, most significant bit first. Each code frame's codes
    depend on its own frames only."""
    n, share = f0.shape[-1], PITCH_SHARE
    pad = -n % factor
    f0 = F.pad(f0, (0, pad), value=UNVOICED_F0).unflatten(-1, (-1, factor // share, share))
    voiced = F.pad(voiced, (0, pad)).unflatten(-1, (-1, factor // share, share))
    count = voiced.sum(-1)  # (B, N', factor // share)
    log_f0 = (torch.log(f0) * voiced).sum(-1) / count.clamp(min=1)
    levels = 2**PITCH_BITS - 1
    span = math.log(F0_MAX / F0_MIN)
    pitch = torch.round((log_f0 - math.log(F0_MIN)) / span * levels).clamp(0, levels).long()
    pitch = torch.where(count > 0, pitch, 0)
    weights = 2 ** torch.arange(factor - 1, -1, -1)
    bits = (voiced.flatten(-2).long() * weights).sum(-1, keepdim=True)
    return torch.cat([pitch, bits], -1).transpose(1, 2)


def pitch_from_codes(codes: Tensor, factor: int, n_frames: int) -> tuple[Tensor, Tensor]:
    """F0 (Hz) and voicing ``(B, n_frames)`` from :func:`pitch_codes`: each log-F0 code sits at
    the centre of its share of frames and F0 is interpolated linearly in log between them; shares
    with no voiced frame take it from their voiced neighbours (:func:`fill_unvoiced`)."""
    share = PITCH_SHARE
    shifts = torch.arange(factor - 1, -1, -1)
    voiced = ((codes[:, -1, :, None] >> shifts) & 1).flatten(1).float()  # (B, N' * factor)
    span = math.log(F0_MAX / F0_MIN)
    log_f0 = (
        math.log(F0_MIN)
        + codes[:, :-1].transpose(1, 2).flatten(1).float() / (2**PITCH_BITS - 1) * span
    )  # (B, M) with M = N' * factor // share
    has_voice = voiced.unflatten(-1, (-1, share)).amax(-1)
    f0 = fill_unvoiced(torch.exp(log_f0), has_voice)
    centres = torch.arange(f0.shape[-1]) * share + (share - 1) / 2
    frames = torch.arange(n_frames, dtype=centres.dtype).expand(f0.shape[0], -1)
    f0 = torch.exp(_interp(centres, torch.log(f0), frames))
    return f0, voiced[:, :n_frames]


def _interp(knots: Tensor, values: Tensor, queries: Tensor) -> Tensor:
    """Piecewise-linear interpolation: ``values (..., K)`` given at increasing ``knots (K,)``,
    read at ``queries (..., Q)`` (the same leading shape), held beyond the first and last knot."""
    if len(knots) == 1:
        return values.expand(*queries.shape).contiguous()
    index = torch.searchsorted(knots, queries.contiguous()).clamp(1, len(knots) - 1)
    lo, hi = knots[index - 1], knots[index]
    frac = ((queries - lo) / (hi - lo)).clamp(0, 1)
    return torch.lerp(values.gather(-1, index - 1), values.gather(-1, index), frac)
