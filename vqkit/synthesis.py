"""Waveform synthesis from decoded features: the codec's last stage, chosen per model.

A synthesiser turns features ``(B, F, N)`` into a waveform ``(B, T)``. There are two, each
registered in :func:`make_synthesiser`: Griffin-Lim on the linear magnitude of ``stft`` and
``mel`` features (``codec.synthesis = "griffinlim"``), and the harmonic-plus-noise synthesiser of
``envelope`` features, whose rows are the envelope in dB, F0 and voicing
(``"harmonic"``, :class:`vqkit.parametric.HarmonicNoise`).

:func:`synthesise_chunked` runs any synthesiser on overlapping windows of a feature stream and
joins them with a crossfade, so memory stays bounded however long the recording.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from vqkit.config import CodecConfig
from vqkit.errors import VqkitError
from vqkit.features import Frontend, griffin_lim
from vqkit.parametric import EnvelopeFrontend, HarmonicNoise

SYNTHESISERS = ("griffinlim", "harmonic")


class Synthesiser(Protocol):
    """Features ``(B, F, N)`` -> waveform ``(B, T)`` with ``T = length``; frame ``i`` is centred
    on sample ``i * hop_length``. ``first_frame`` is where the features start in a longer stream
    synthesised window by window, for synthesisers that keep a phase going across windows."""

    hop_length: int

    def __call__(self, features: Tensor, length: int, first_frame: int = 0) -> Tensor: ...


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


def postfilter(features: Tensor, contrast: float) -> Tensor:
    """Stretch dB features ``(..., F, N)`` about each frame's mean over ``F`` by ``contrast``.

    Autoencoders over-smooth spectra (flatter peaks and valleys than speech has); expanding each
    frame's contrast, as speech codecs' post-filters do, restores some of it. 1 returns the input.
    """
    if not contrast > 0:
        raise VqkitError(f"codec.postfilter must be positive, got {contrast}")
    if contrast == 1.0:
        return features
    mean = features.mean(dim=-2, keepdim=True)
    return mean + contrast * (features - mean)


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
        return GriffinLim(frontend, config.gl_iters if iters is None else iters, config.gl_momentum)
    raise VqkitError(
        f"unknown codec.synthesis '{config.synthesis}'; valid: {', '.join(SYNTHESISERS)}"
    )


def crossfade(tail: np.ndarray, head: np.ndarray) -> np.ndarray:
    """Fade from ``tail`` into ``head`` (both ``(X,)``, the same stretch of audio synthesised
    twice), keeping the power steady: the gain law adapts to their correlation, linear for
    identical signals and equal-power for unrelated ones (two Griffin-Lim phases)."""
    denominator = math.sqrt(float(np.dot(tail, tail) * np.dot(head, head))) or 1.0
    rho = min(max(float(np.dot(tail, head)) / denominator, 0.0), 1.0)
    w = (np.arange(len(tail)) + 0.5) / len(tail)
    gain = 1.0 / np.sqrt((1 - w) ** 2 + w**2 + 2 * rho * w * (1 - w))
    return ((1 - w) * gain * tail + w * gain * head).astype(np.float32)


def synthesise_chunked(
    synthesiser: Synthesiser,
    features: Iterable[Tensor],
    n_frames: int,
    length: int,
    window_frames: int,
    overlap_frames: int,
) -> Iterator[np.ndarray]:
    """Synthesise a feature stream window by window; yield consecutive wave blocks ``(T_i,)``.

    ``features`` yields consecutive chunks ``(F, N_i)`` (in dB) that add up to ``n_frames``;
    the blocks add up to ``length`` samples. Window ``k`` owns frames ``[kW, (k+1)W)`` and is
    synthesised with ``overlap_frames`` more on each side; neighbours are crossfaded over
    ``overlap_frames * hop_length`` samples centred on their boundary. One window covering
    everything is exactly ``synthesiser(features, length)``.
    """
    hop, margin = synthesiser.hop_length, overlap_frames
    if window_frames < 2 * margin or margin < 2:
        raise ValueError(f"need window_frames >= 2 * overlap_frames >= 4, got {window_frames}")
    fade = margin * hop // 2  # half the crossfade, in samples
    buffer, start = _FrameBuffer(iter(features)), 0  # next sample to emit
    tail = np.zeros(0, dtype=np.float32)  # the previous window's share of the next crossfade
    for k in range(math.ceil(n_frames / window_frames)):
        first = max(0, k * window_frames - margin)
        last = min(n_frames, (k + 1) * window_frames + margin)  # frames [first, last)
        reach = length if last == n_frames else (last - 1) * hop + 1
        with torch.inference_mode():
            wave = synthesiser(buffer.take(first, last)[None], reach - first * hop, first)[0]
        wave = wave.numpy()  # samples [first * hop, reach)
        boundary = min((k + 1) * window_frames * hop, length)
        end = length if boundary == length else boundary - fade  # emit [start, end)
        block = wave[start - first * hop : end - first * hop]
        if len(tail):
            block = np.concatenate([crossfade(tail, block[: len(tail)]), block[len(tail) :]])
        yield block
        tail = wave[end - first * hop : min(boundary + fade, length) - first * hop]
        start = end


class _FrameBuffer:
    """Frames of a chunked feature stream, kept from the oldest still needed."""

    def __init__(self, chunks: Iterator[Tensor]) -> None:
        self.chunks, self.frames, self.offset = chunks, None, 0

    def take(self, first: int, last: int) -> Tensor:
        """Frames ``[first, last)`` ``(F, last - first)``; earlier frames are dropped for good."""
        while self.frames is None or self.offset + self.frames.shape[-1] < last:
            chunk = next(self.chunks, None)
            if chunk is None:
                raise ValueError(f"the feature stream ended before frame {last}")
            self.frames = chunk if self.frames is None else torch.cat([self.frames, chunk], -1)
        self.frames = self.frames[:, first - self.offset :]
        self.offset = first
        return self.frames[:, : last - first]
