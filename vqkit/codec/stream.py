"""Chunked synthesis: any synthesiser run window by window over a feature stream, the windows
joined by a crossfade, so memory stays bounded however long the recording; and the soft limiter
that keeps decoded audio below full scale."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch import Tensor

from vqkit.audio.synthesis import Synthesiser


def crossfade(tail: np.ndarray, head: np.ndarray) -> np.ndarray:
    """Fade from ``tail`` into ``head`` (both ``(X,)``, the same stretch of audio synthesised
    twice), keeping the power steady: the gain law adapts to their correlation, linear for
    identical signals and equal-power for unrelated ones (two Griffin-Lim phases)."""
    denominator = math.sqrt(float(np.dot(tail, tail) * np.dot(head, head))) or 1.0
    rho = min(max(float(np.dot(tail, head)) / denominator, 0.0), 1.0)
    w = (np.arange(len(tail)) + 0.5) / len(tail)
    gain = 1.0 / np.sqrt((1 - w) ** 2 + w**2 + 2 * rho * w * (1 - w))
    return ((1 - w) * gain * tail + w * gain * head).astype(np.float32)


LIMIT_KNEE = 0.9  # samples above this are compressed smoothly towards (never to) full scale
LIMIT_CEILING = 32767 / 32768  # the largest 16-bit sample


def soft_limit(wave: np.ndarray) -> np.ndarray:
    """``wave`` ``(T,)`` with every sample below full scale: unchanged up to :data:`LIMIT_KNEE`,
    above it bent by a tanh that meets the line with slope 1 and never reaches 1. Harmonics
    started in phase make a peakier waveform than the speech they code (on loud, shouted clips
    peaks went 10 % above the input's), and clipping them in the written file would distort."""
    over = np.abs(wave) > LIMIT_KNEE
    if not over.any():
        return wave
    headroom = 1.0 - LIMIT_KNEE
    bent = LIMIT_KNEE + headroom * np.tanh((np.abs(wave) - LIMIT_KNEE) / headroom)
    bent = np.minimum(bent, LIMIT_CEILING)  # tanh rounds to 1 far above the knee
    return np.where(over, np.sign(wave) * bent, wave).astype(wave.dtype)


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
