"""Waveform synthesis from decoded features: the codec's last stage, chosen per model.

A synthesiser turns features ``(B, F, N)`` into a waveform ``(B, T)``. There are two, each
registered in :func:`make_synthesiser`: Griffin-Lim on the linear magnitude of ``stft`` and
``mel`` features (``codec.synthesis = "griffinlim"``), and the harmonic-plus-noise synthesiser of
``envelope`` features, which also takes F0 and voicing by name (``"harmonic"``,
:class:`HarmonicNoise`). :class:`Frames` carries features and that side information together,
frame by frame, through the codec's buffers.

:func:`vqkit.codec.stream.synthesise_chunked` runs any synthesiser on overlapping windows of a
feature stream and joins them with a crossfade, so memory stays bounded however long the recording.

:class:`HarmonicNoise`: the envelope is interpolated (in dB, on the mel scale) at each harmonic of
F0 and at every STFT bin. Voiced frames are a bank of harmonic oscillators whose phase is the
running integral of F0 and whose amplitudes give each harmonic the power the envelope measured
around it; all frames also get white noise shaped by the envelope in the STFT domain, scaled by
``noise_voiced`` in voiced frames and 1 in unvoiced ones. The calibration makes a sinusoid or a
white noise come back at the level it was analysed at.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from vqkit.audio.envelope import EnvelopeFrontend, interp
from vqkit.audio.pitch import F0_MIN
from vqkit.audio.stft import Frontend, griffin_lim, hz_to_mel_htk, istft, stft
from vqkit.config import CodecConfig, Synthesis, check_value, choices
from vqkit.errors import VqkitError

SYNTHESISERS = choices(Synthesis)
# Frames of harmonics synthesised at a time: the work arrays are harmonics x samples, ~600 MB
# for a whole codec chunk (20 s) at once; blocks keep that to a few MB, the same result.
SYNTHESIS_BLOCK_FRAMES = 32


class Synthesiser(Protocol):
    """Features ``(B, F, N)`` -> waveform ``(B, T)`` with ``T = length``; frame ``i`` is centred
    on sample ``i * hop_length``. ``first_frame`` is where the features start in a longer stream
    synthesised window by window, for synthesisers that keep a phase going across windows. Side
    information comes by name (the harmonic synthesiser's ``f0`` and ``voiced``, ``(B, N)``)."""

    hop_length: int

    def __call__(
        self, features: Tensor, length: int, first_frame: int = 0, **side: Tensor
    ) -> Tensor: ...


@dataclass(frozen=True)
class Frames:
    """What a synthesiser takes, frame by frame: ``features`` ``(..., F, N)`` (in dB) and, for
    the harmonic synthesiser, F0 in Hz and voicing (0..1) ``(..., N)``; None for the others.
    The frame axis is the last of each, so the three are cut and joined together."""

    features: Tensor
    f0: Tensor | None = None
    voiced: Tensor | None = None

    def __post_init__(self) -> None:
        if (self.f0 is None) != (self.voiced is None):
            raise ValueError("Frames need both f0 and voiced, or neither")
        expected = self.features.shape[:-2] + self.features.shape[-1:]
        for name, side in (("f0", self.f0), ("voiced", self.voiced)):
            if side is not None and side.shape != expected:
                raise ValueError(
                    f"Frames.{name} must be {tuple(expected)} to fit features "
                    f"{tuple(self.features.shape)}, got {tuple(side.shape)}"
                )

    @property
    def n_frames(self) -> int:
        return self.features.shape[-1]

    def __getitem__(self, frames: slice) -> Frames:
        """The frames ``frames`` (a slice along the frame axis) of every tensor."""
        if self.f0 is None:
            return Frames(self.features[..., frames])
        return Frames(self.features[..., frames], self.f0[..., frames], self.voiced[..., frames])

    @staticmethod
    def cat(parts: Sequence[Frames]) -> Frames:
        """``parts`` (at least one) joined along the frame axis, in order."""
        if not parts:
            raise ValueError("Frames.cat needs at least one part, got none")
        features = torch.cat([part.features for part in parts], -1)
        if parts[0].f0 is None:
            return Frames(features)
        f0 = torch.cat([part.f0 for part in parts], -1)
        return Frames(features, f0, torch.cat([part.voiced for part in parts], -1))

    def synthesise(self, synthesiser: Synthesiser, length: int, first_frame: int = 0) -> Tensor:
        """Unbatched frames (``features`` ``(F, N)``, side ``(N,)``) through ``synthesiser`` as a
        batch of one, side information passed by name: the waveform ``(length,)``."""
        side = {} if self.f0 is None else {"f0": self.f0[None], "voiced": self.voiced[None]}
        return synthesiser(self.features[None], length, first_frame, **side)[0]


class GriffinLim:
    """The front end's inverse to a linear magnitude, then fast Griffin-Lim for the phase."""

    def __init__(self, frontend: Frontend, n_iter: int = 32, momentum: float = 0.99) -> None:
        if n_iter < 1:
            raise VqkitError(f"Griffin-Lim needs at least 1 iteration, got {n_iter}")
        self.frontend, self.n_iter, self.momentum = frontend, n_iter, momentum
        self.hop_length = frontend.hop_length

    def __call__(self, features: Tensor, length: int, first_frame: int = 0) -> Tensor:
        magnitude = self.frontend.to_magnitude(features)
        return griffin_lim(
            magnitude,
            n_fft=self.frontend.n_fft,
            hop_length=self.frontend.hop_length,
            win_length=self.frontend.win_length,
            n_iter=self.n_iter,
            momentum=self.momentum,
            length=length,
        )


def postfilter(features: Tensor, contrast: float, bandwidths: Tensor | None = None) -> Tensor:
    """Stretch dB features ``(..., F, N)`` about each frame's mean over ``F`` by ``contrast``,
    keeping each frame's power.

    Autoencoders over-smooth spectra (flatter peaks and valleys than speech has); expanding each
    frame's contrast, as speech codecs' post-filters do, restores some of it. Stretching alone
    raises the formant peaks, which carry most of the power, so decoded speech came back about
    4 dB louder than its input and clipped; like Codec 2's post-filter, each frame is then scaled
    back to the power it had: the sum over rows of ``bandwidths`` ``(F,)`` (Hz, or any weights of
    the frequency range each row stands for; equal when None) times the power ``10^(dB/10)``.
    1 returns the input.
    """
    if not contrast > 0:
        raise VqkitError(f"codec.postfilter must be positive, got {contrast}")
    if contrast == 1.0:
        return features
    mean = features.mean(dim=-2, keepdim=True)
    stretched = mean + contrast * (features - mean)
    return stretched + _power_db(features, bandwidths) - _power_db(stretched, bandwidths)


def _power_db(features: Tensor, bandwidths: Tensor | None) -> Tensor:
    """Each frame's power in dB ``(..., 1, N)`` of dB features ``(..., F, N)``, rows weighted by
    ``bandwidths`` ``(F,)`` (equal when None)."""
    scale = math.log(10) / 10
    log_power = features * scale
    if bandwidths is not None:
        log_power = log_power + torch.log(bandwidths.to(features.dtype))[:, None]
    return torch.logsumexp(log_power, dim=-2, keepdim=True) / scale


def make_synthesiser(
    config: CodecConfig, frontend: Frontend, iters: int | None = None
) -> Synthesiser:
    """The synthesiser ``config.synthesis`` names; ``iters`` overrides ``config.gl_iters``."""
    if (config.synthesis == "harmonic") != isinstance(frontend, EnvelopeFrontend):
        raise VqkitError(
            f"codec.synthesis '{config.synthesis}' does not fit these features: 'harmonic' "
            "synthesises envelope features, 'griffinlim' stft and mel ones"
        )
    if config.synthesis == "harmonic":
        if iters is not None:
            raise VqkitError(
                "--iters sets Griffin-Lim iterations; this model synthesises harmonics"
            )
        return HarmonicNoise(frontend, config.noise_voiced)
    if config.synthesis == "griffinlim":
        if iters is not None:
            check_value("codec.gl_iters", iters, "--iters")
        return GriffinLim(frontend, config.gl_iters if iters is None else iters, config.gl_momentum)
    raise VqkitError(
        f"unknown codec.synthesis '{config.synthesis}'; valid: {', '.join(SYNTHESISERS)}"
    )


class HarmonicNoise(torch.nn.Module):
    """The synthesiser of ``codec.synthesis = "harmonic"``: the envelope in dB ``(B, K, N)``,
    F0 in Hz and voicing ``(B, N)`` -> waveform ``(B, T)``.

    Differentiable in the envelope; frame ``i`` is centred on sample ``i * hop_length``. The noise
    is seeded, so the same features give the same waveform. Called window by window on a stream
    (:func:`vqkit.codec.stream.synthesise_chunked`), it carries the harmonics' phase from one window
    into the next, so overlapping windows agree where they overlap.
    """

    def __init__(self, frontend: EnvelopeFrontend, noise_voiced: float, seed: int = 0) -> None:
        super().__init__()
        if not 0 <= noise_voiced <= 1:
            raise VqkitError(f"codec.noise_voiced must be in 0..1, got {noise_voiced}")
        self.frontend, self.noise_voiced, self.seed = frontend, noise_voiced, seed
        self._phases: tuple[int, Tensor] | None = None  # the last window's first frame, phases
        self.sample_rate, self.hop_length = frontend.sample_rate, frontend.hop_length
        mel_points = hz_to_mel_htk(frontend.freqs)
        self.register_buffer("mel_points", mel_points, persistent=False)
        bins = torch.arange(frontend.n_fft // 2 + 1) * self.sample_rate / frontend.n_fft
        self.register_buffer("bin_mel", hz_to_mel_htk(bins), persistent=False)

    def forward(
        self, features: Tensor, length: int, first_frame: int = 0, *, f0: Tensor, voiced: Tensor
    ) -> Tensor:
        """The waveform ``(B, length)`` of the envelope ``features`` ``(B, K, N)`` (dB), ``f0``
        (Hz) and ``voiced`` ``(B, N)``; ``first_frame`` as in :class:`Synthesiser`."""
        expected = (features.shape[0], features.shape[-1])
        if features.dim() != 3 or f0.shape != expected or voiced.shape != expected:
            raise ValueError(
                f"expected an envelope (B, K, N) with f0 and voiced (B, N), got "
                f"{tuple(features.shape)}, {tuple(f0.shape)} and {tuple(voiced.shape)}"
            )
        start = torch.zeros_like(f0[:, :1])
        if first_frame and self._phases is not None:  # continue the previous window's phase
            offset, phases = self._phases
            if offset <= first_frame < offset + phases.shape[-1]:
                start = phases[:, first_frame - offset, None]
        wave, phases = self._synthesise(features, f0, voiced, length, start, first_frame)
        self._phases = first_frame, phases.detach()
        return wave

    def _synthesise(
        self, env_db: Tensor, f0: Tensor, voiced: Tensor, length: int, start: Tensor, seed: int
    ) -> tuple[Tensor, Tensor]:
        """The waveform, and the fundamental's phase at each frame ``(B, N)``, from the phase
        ``start`` ``(B, 1)`` at the first sample; the noise is seeded by ``seed``."""
        harmonics, phases = self.harmonics(env_db, f0, voiced, length, start)
        return harmonics + self.noise(env_db, voiced, length, seed), phases

    def _at(self, env_db: Tensor, mel: Tensor) -> Tensor:
        """The envelope ``(B, K, N)`` in dB at mel positions ``(B, N, H)``: ``(B, N, H)``."""
        return interp(self.mel_points, env_db.transpose(1, 2), mel)

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
        power_db = self._at(env_db, hz_to_mel_htk(freqs.clamp(max=sr / 2)))
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
        amp = amp.transpose(1, 2)  # (B, H, N)
        wave = env_db.new_empty(env_db.shape[0], length)
        step = SYNTHESIS_BLOCK_FRAMES * hop
        for s0 in range(0, length, step):  # samples [s0, s1) from frames [f, ...)
            s1, f = min(s0 + step, length), min(s0 // hop, amp.shape[-1] - 1)
            block = _upsample(amp[..., f : f + SYNTHESIS_BLOCK_FRAMES + 1], hop, s1 - f * hop)
            # the harmonics' phases are multiples of the fundamental's, wrapped in double precision
            waves = torch.sin(phase[:, None, s0:s1] * k[:, None])  # (B, H, T_i); k x phase < 2000
            wave[:, s0:s1] = (block[..., s0 - f * hop :] * waves).sum(1)
        return wave, phases

    def noise(self, env_db: Tensor, voiced: Tensor, length: int, seed: int = 0) -> Tensor:
        a = self.frontend
        generator = torch.Generator().manual_seed(self.seed + seed)
        white = torch.randn(env_db.shape[0], length, generator=generator, dtype=env_db.dtype)
        # E|X|^2 = sum w^2 for unit-variance white noise
        spec = stft(white, a.n_fft, a.hop_length, a.win_length, a.window)
        n = min(spec.shape[-1], env_db.shape[-1])
        mel = self.bin_mel.expand(env_db.shape[0], n, -1)
        power_db = self._at(env_db[..., :n], mel)  # (B, N, bins)
        # fractional voicing (concealment fades it) moves the noise between the two gains
        gain = (1 - (1 - self.noise_voiced) * voiced[..., :n].clamp(0, 1))[..., None]
        scale = gain * torch.sqrt(torch.pow(10.0, power_db / 10) / a.window_power)
        spec = spec[..., :n] * scale.transpose(1, 2)
        return istft(spec, a.n_fft, a.hop_length, a.win_length, a.window, length=length)


def _upsample(x: Tensor, hop: int, length: int) -> Tensor:
    """Frame values ``(B, C, N)`` (frame i at sample i * hop) linearly to samples ``(B, C, T)``,
    the last frame held."""
    n = x.shape[-1]
    if n > 1:
        x = F.interpolate(x, size=(n - 1) * hop + 1, mode="linear", align_corners=True)
    if x.shape[-1] < length:
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], length - x.shape[-1])], -1)
    return x[..., :length]
