"""Chunked synthesis: any synthesiser run window by window over a stream of
:class:`~vqkit.audio.synthesis.Frames` (features, and pitch and voicing where the synthesiser
takes them), the windows joined by a crossfade, so memory stays bounded however long the
recording; its streaming form for real-time decoding, fed a packet's frames at a time
(:class:`WindowSynthesiser`); and the soft limiter that keeps decoded audio below full scale."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from vqkit.audio.synthesis import Frames, Synthesiser


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
    frames: Iterable[Frames],
    n_frames: int,
    length: int,
    window_frames: int,
    overlap_frames: int,
) -> Iterator[np.ndarray]:
    """Synthesise a stream of frames window by window; yield consecutive wave blocks ``(T_i,)``.

    ``frames`` yields consecutive unbatched chunks (features ``(F, N_i)`` in dB, side ``(N_i,)``)
    that add up to ``n_frames``; the blocks add up to ``length`` samples. Window ``k`` owns frames
    ``[kW, (k+1)W)`` and is synthesised with ``overlap_frames`` more on each side; neighbours are
    crossfaded over ``overlap_frames * hop_length`` samples centred on their boundary. One window
    covering everything is exactly ``Frames.cat(frames).synthesise(synthesiser, length)``.
    """
    hop, margin = synthesiser.hop_length, overlap_frames
    if window_frames < 2 * margin or margin < 2:
        raise ValueError(f"need window_frames >= 2 * overlap_frames >= 4, got {window_frames}")
    fade = margin * hop // 2  # half the crossfade, in samples
    buffer, start = _FrameBuffer(iter(frames)), 0  # next sample to emit
    tail = np.zeros(0, dtype=np.float32)  # the previous window's share of the next crossfade
    for k in range(math.ceil(n_frames / window_frames)):
        first = max(0, k * window_frames - margin)
        last = min(n_frames, (k + 1) * window_frames + margin)  # frames [first, last)
        reach = length if last == n_frames else (last - 1) * hop + 1
        with torch.inference_mode():
            wave = buffer.take(first, last).synthesise(synthesiser, reach - first * hop, first)
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
    """Frames of a chunked stream, kept from the oldest still needed."""

    def __init__(self, chunks: Iterator[Frames]) -> None:
        self.chunks, self.offset = chunks, 0
        self.frames: Frames | None = None

    def take(self, first: int, last: int) -> Frames:
        """Frames ``[first, last)``; earlier frames are dropped for good."""
        while self.frames is None or self.offset + self.frames.n_frames < last:
            chunk = next(self.chunks, None)
            if chunk is None:
                raise ValueError(f"the feature stream ended before frame {last}")
            self.frames = chunk if self.frames is None else Frames.cat([self.frames, chunk])
        self.frames = self.frames[first - self.offset :]
        self.offset = first
        return self.frames[: last - first]


SYNTH_MARGIN = 2  # frames a streaming window is synthesised beyond its own, either side


class WindowSynthesiser:
    """Frames in as they are decoded; the waveform out, window by window (the streaming form
    of :func:`synthesise_chunked`).

    Window ``k`` owns frames ``[k W - M, (k + 1) W - M)`` (``W = window_frames``, ``M`` =
    :data:`SYNTH_MARGIN`; the first window starts at 0), is synthesised with ``M`` more frames
    either side and crossfaded into the next over ``M * hop_length`` samples. The windows sit
    ``M`` frames early so that a window is complete as soon as the ``W`` frames of one packet
    are: the synthesis waits for no later packet.
    """

    def __init__(self, synthesiser: Synthesiser, window_frames: int) -> None:
        if window_frames < 2 * SYNTH_MARGIN:
            raise ValueError(f"need window_frames >= {2 * SYNTH_MARGIN}, got {window_frames}")
        self.synthesiser, self.window = synthesiser, window_frames
        self.hop = synthesiser.hop_length
        self.frames: Frames | None = None  # from frame self.offset on
        self.offset, self.n_windows, self.start = 0, 0, 0
        self.tail = np.zeros(0, dtype=np.float32)

    def push(self, frames: Frames, hold: bool = False) -> np.ndarray:
        """Append unbatched frames (features ``(F, N)``); return the samples of the windows now
        complete (``hold``: keep the frames for :meth:`finish`)."""
        self.frames = frames if self.frames is None else Frames.cat([self.frames, frames])
        blocks = []
        available = self.offset + self.frames.n_frames
        while not hold and self._bound(self.n_windows) + SYNTH_MARGIN <= available:
            blocks.append(self._window(None, None))
        return np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.float32)

    def finish(self, n_frames: int, length: int) -> np.ndarray:
        """The remaining windows of a stream of ``n_frames`` frames and ``length`` samples."""
        blocks = []
        while self.frames is not None and self._bound(self.n_windows - 1) < n_frames:
            blocks.append(self._window(n_frames, length))
        return np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.float32)

    def _bound(self, k: int) -> int:
        """The frame where window ``k`` ends and ``k + 1`` begins (0 for ``k = -1``)."""
        return max(0, (k + 1) * self.window - SYNTH_MARGIN)

    def _window(self, n_frames: int | None, length: int | None) -> np.ndarray:
        k, hop, margin = self.n_windows, self.hop, SYNTH_MARGIN
        fade = margin * hop // 2
        first, last = max(0, self._bound(k - 1) - margin), self._bound(k) + margin
        if n_frames is not None:
            last = min(last, n_frames)
        reach = length if last == n_frames else (last - 1) * hop + 1
        frames = self.frames[first - self.offset : last - self.offset]
        with torch.inference_mode():
            wave = frames.synthesise(self.synthesiser, reach - first * hop, first).numpy()
        boundary = self._bound(k) * hop
        if length is not None:
            boundary = min(boundary, length)
        end = length if boundary == length else boundary - fade  # emit [start, end)
        block = wave[self.start - first * hop : end - first * hop]
        if len(self.tail):
            head = block[: len(self.tail)]
            block = np.concatenate([crossfade(self.tail[: len(head)], head), block[len(head) :]])
        tail_end = boundary + fade if length is None else min(boundary + fade, length)
        self.tail = wave[end - first * hop : tail_end - first * hop]
        self.start, self.n_windows = end, k + 1
        keep = max(0, self._bound(k) - margin)
        self.frames, self.offset = self.frames[keep - self.offset :], keep
        return block
