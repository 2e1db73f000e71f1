"""Real-time coding: PCM in, packets out as soon as each code frame is complete, and back.

:class:`StreamEncoder` takes PCM blocks of any size and returns the packets they complete;
:class:`StreamDecoder` takes packets (or ``None`` for a lost one) and returns the audio they
complete. Both run the same networks, front end and synthesiser as whole-file coding
(:mod:`vqkit.codec.codec`), on windows bounded by what each stage actually looks at:

- the encoder codes frame ``j`` once the samples its features and its network reach have arrived:
  the network's right reach (measured once, :func:`reach_sides`) in feature frames,
  plus the analysis window (STFT, pitch tracking) in samples;
- the decoder decodes frame ``j`` once the decoder network's right reach in packets has arrived;
- the synthesiser makes one packet's frames at a time with a margin and a crossfade, carrying the
  harmonics' phase (:class:`vqkit.codec.stream.WindowSynthesiser`).

So streaming gives the codes of whole-file encoding and audio that differs from file decoding
only in the synthesis windows. The delay of the chain is :meth:`Lookahead.latency_samples`.
A lost packet's frames come from :class:`vqkit.codec.conceal.Concealer`.
"""

from __future__ import annotations

import copy
import math
from typing import Protocol

import numpy as np
import soxr
import torch
from torch import Tensor, nn

from vqkit.audio.envelope import EnvelopeFrontend
from vqkit.audio.synthesis import Frames, make_synthesiser
from vqkit.codec.codefile import packed_size
from vqkit.codec.conceal import Concealer
from vqkit.codec.packets import StreamHeader, pack_packet, unpack_packet
from vqkit.codec.stream import SYNTH_MARGIN, WindowSynthesiser, soft_limit
from vqkit.config import Config
from vqkit.errors import VqkitError

PROBE_FRAMES = 256  # first input length for measuring a network's reach
MAX_PROBE_FRAMES = 16384


class Codec(Protocol):
    """What real-time coding uses of :class:`vqkit.codec.codec.Codec` (which imports this
    module, so it cannot import that one)."""

    model_id: str
    sample_rate: int
    hop_length: int
    downsample: int
    n_codebooks: int
    side: tuple[int, ...]
    config: Config
    frontend: nn.Module
    model: nn.Module
    lookahead: Lookahead

    def codebook_sizes(self, n_stages: int) -> tuple[int, ...]: ...

    def encode_window(self, wave: Tensor, frames: slice, n_stages: int) -> Tensor: ...

    def decode_window(self, codes: Tensor) -> Frames: ...


def reach_sides(net: nn.Module, channels: int, factor: int, downsampling: bool) -> tuple[int, int]:
    """How far (in input frames) an output frame of a 1-D conv net looks back and ahead.

    Measured on a copy of the net whose weights are all made positive, fed ones: every unit is
    then active, so the input gradient is non-zero exactly where the output depends on the input
    at all (random inputs through the trained net can leave units off and under-count). The
    probe doubles until the reach fits inside it. Downsampling nets (encoders) map ``factor``
    input frames to one output frame and the reach counts from the first of them; upsampling
    nets (decoders) map one input frame to ``factor`` output frames.
    """
    with torch.inference_mode(False), torch.no_grad():  # a caller's inference mode aside
        probe = copy.deepcopy(net).eval()
        for module in probe.modules():
            for store in (module._parameters, module._buffers):
                for name, tensor in store.items():
                    if tensor is not None and tensor.is_floating_point():
                        store[name] = type(tensor)(tensor.abs().double() + 1e-3)
    length = PROBE_FRAMES
    while True:  # gradients work inside a caller's inference_mode too
        middle = length // 2 // factor * factor  # an input frame on the output grid
        out = (
            slice(middle // factor, middle // factor + 1)
            if downsampling
            else slice(middle * factor, (middle + 1) * factor)
        )
        with torch.inference_mode(False), torch.enable_grad():
            x = torch.ones(1, channels, length, dtype=torch.float64, requires_grad=True)
            (grad,) = torch.autograd.grad(probe(x)[..., out].sum(), x)
        index = torch.nonzero(grad[0].abs().sum(0) > 0)[:, 0]
        if index.numel() == 0:  # the output ignores its input altogether
            return 0, 0
        low, high = int(index.min()), int(index.max())
        if (low > 0 and high < length - 1) or length >= MAX_PROBE_FRAMES:
            return middle - low, high - middle
        length *= 2


def analysis_reach(frontend: nn.Module) -> tuple[int, int]:
    """Samples of signal a feature frame's analysis reads before and after its centre: half the
    STFT, or for the envelope front end its pitch tracker's reach where that is further."""
    half = frontend.n_fft // 2
    if isinstance(frontend, EnvelopeFrontend):
        back, ahead = frontend.tracker.reach()
        return max(half, back), max(half, ahead)
    return half, half


class Lookahead:
    """What each stage of a codec waits for, measured once from the model."""

    def __init__(self, codec: Codec) -> None:
        d, model = codec.downsample, codec.model
        encoder = reach_sides(model.encoder, codec.frontend.n_bins, d, downsampling=True)
        decoder = reach_sides(model.decoder, model.bottleneck.latent_dim, d, downsampling=False)
        self.encoder_back, self.encoder_ahead = encoder  # feature frames
        self.decoder_back, self.decoder_ahead = decoder  # code frames
        self.analysis_back, self.analysis_ahead = analysis_reach(codec.frontend)  # samples
        self.hop_length, self.downsample = codec.hop_length, d

    def analysis_start(self, first: int) -> int:
        """The first model-rate sample the analysis of feature frames from ``first`` on reads, on
        a frame boundary so that the frames of a window line up with the whole stream's."""
        return max(0, first - math.ceil(self.analysis_back / self.hop_length)) * self.hop_length

    def analysis_end(self, last: int) -> int:
        """Model-rate samples the analysis of the feature frames before ``last`` needs."""
        return (last - 1) * self.hop_length + self.analysis_ahead + 1

    def encoder_needs(self, j: int) -> int:
        """Model-rate samples the encoder needs before it can code frame ``j``."""
        d = self.downsample
        last = max((j + 1) * d - 1, j * d + self.encoder_ahead)  # its last feature frame
        return self.analysis_end(last + 1)

    def decoder_gives(self, n_packets: int) -> int:
        """Model-rate samples of audio the decoder has given after ``n_packets`` packets."""
        d, hop = self.downsample, self.hop_length
        final = (n_packets - self.decoder_ahead) * d  # feature frames decoded for good
        n_windows = max(0, final // d)  # synthesis windows done (see WindowSynthesiser)
        end = (n_windows * d - SYNTH_MARGIN) * hop - SYNTH_MARGIN * hop // 2
        return max(0, end) if n_windows else 0

    def latency_samples(self) -> int:
        """The algorithmic delay: from a sample entering the encoder to its coming out of the
        decoder, at worst (the first sample of a packet), with packets passed on at once."""
        j = self.decoder_ahead + self.encoder_ahead + 16  # any packet past the start
        return self.encoder_needs(j) - self.decoder_gives(j)


class StreamEncoder:
    """PCM blocks in, packets out (see :meth:`vqkit.codec.Codec.stream_encoder`)."""

    def __init__(self, codec: Codec, n_stages: int, sample_rate: int, gain_db: int = 0) -> None:
        self.codec, self.n_stages, self.lookahead = codec, n_stages, codec.lookahead
        self.header = StreamHeader(
            model_id=codec.model_id,
            sample_rate=codec.sample_rate,
            orig_sample_rate=sample_rate,
            hop_length=codec.hop_length,
            downsample=codec.downsample,
            gain_db=gain_db,
            codebook_sizes=codec.codebook_sizes(n_stages),
        )
        self.scale = np.float32(10 ** (gain_db / 20))
        self.resampler = _resampler(sample_rate, codec.sample_rate)
        self.buffer, self.offset = np.zeros(0, dtype=np.float32), 0  # samples from offset
        self.next_code, self.finished = 0, False

    def push(self, pcm: np.ndarray) -> list[bytes]:
        """Take mono float samples ``(T,)``; return the packets they complete."""
        if self.finished:
            raise VqkitError("the stream encoder was flushed; make a new one")
        pcm = np.asarray(pcm, dtype=np.float32)
        if pcm.ndim != 1:
            raise ValueError(f"expected mono samples (T,), got {pcm.shape}")
        if not np.isfinite(pcm).all():
            raise VqkitError("audio contains NaN or Inf samples")
        self._append(pcm * self.scale)
        total = self.offset + len(self.buffer)
        ready = self.next_code
        while self.lookahead.encoder_needs(ready) <= total:
            ready += 1
        return self._code(ready, None)

    def flush(self) -> list[bytes]:
        """The packets of whatever is left, to the end of the last code frame."""
        if self.finished:
            return []
        if self.resampler is not None:
            tail = self.resampler.resample_chunk(np.zeros(0, np.float32), last=True)
            self.resampler = None
            self._append(tail)
        self.finished = True
        total = self.offset + len(self.buffer)
        if total == 0:
            return []
        # A live stream has no length: its decoder makes whole packets. Silence completes the
        # last one, so that its frames past the end are quiet, not the network's guess.
        n_codes = math.ceil(self.codec.frontend.n_frames(total) / self.codec.downsample)
        padded = n_codes * self.codec.downsample * self.codec.hop_length - 1
        self.buffer = np.pad(self.buffer, (0, max(0, padded - total)))
        return self._code(n_codes, self.codec.frontend.n_frames(padded))

    def _append(self, block: np.ndarray) -> None:
        if self.resampler is not None:
            block = self.resampler.resample_chunk(block)
        self.buffer = np.concatenate([self.buffer, block])

    def _code(self, stop: int, n_frames: int | None) -> list[bytes]:
        """Code frames ``[next_code, stop)``; ``n_frames`` is the total once the input ended."""
        start, codec, la = self.next_code, self.codec, self.lookahead
        if stop <= start:
            return []
        d, hop = codec.downsample, codec.hop_length
        first = max(0, (start - math.ceil(la.encoder_back / d)) * d)  # feature frames
        last = max(stop * d, (stop - 1) * d + la.encoder_ahead + 1)
        begin, end = la.analysis_start(first), la.analysis_end(last)
        if n_frames is not None:
            last, end = min(last, n_frames), self.offset + len(self.buffer)
        wave = torch.from_numpy(self.buffer[begin - self.offset : end - self.offset])[None]
        frames = slice(first - begin // hop, last - begin // hop)
        with torch.inference_mode():
            codes = codec.encode_window(wave, frames, self.n_stages)  # (Q, L)
        codes = codes[:, start - first // d : stop - first // d]
        self.next_code = stop
        keep = la.analysis_start((stop - math.ceil(la.encoder_back / d)) * d)
        self.buffer, self.offset = self.buffer[keep - self.offset :], keep
        sizes = self.header.codebook_sizes
        return [pack_packet(column, sizes) for column in codes.T]


class StreamDecoder:
    """Packets in (``None`` for a lost one), audio out (see
    :meth:`vqkit.codec.Codec.stream_decoder`)."""

    def __init__(
        self,
        codec: Codec,
        header: StreamHeader | None,
        sample_rate: int | None = None,
    ) -> None:
        self.codec, self.header, self.lookahead = codec, header, codec.lookahead
        if header is not None:
            check_stream(codec, header)
        rate = sample_rate or (header.orig_sample_rate if header else codec.sample_rate)
        self.sample_rate = rate
        self.resampler = _resampler(codec.sample_rate, rate)
        self.synthesiser = WindowSynthesiser(
            make_synthesiser(codec.config.codec, codec.frontend), codec.downsample
        )
        self.concealer = Concealer(codec.downsample)
        self.codes: list[np.ndarray] = []  # code frames not yet decoded for good, and context
        self.lost: list[bool] = []
        self.offset = 0  # code frame index of codes[0]
        self.next_code = 0  # the first code frame not decoded for good
        self.emitted = 0  # samples given, at the output rate
        self.finished = False

    @property
    def n_packets(self) -> int:
        return self.offset + len(self.codes)

    def push(self, packet: bytes | None) -> np.ndarray:
        """Take the next packet (``None``: lost); return the audio ``(T,)`` it completes."""
        if self.finished:
            raise VqkitError("the stream decoder was flushed; make a new one")
        if packet is not None and self.header is None:
            self.header = _header_for(self.codec, len(packet))
        codes = None if packet is None else unpack_packet(packet, self.header.codebook_sizes)
        self.codes.append(codes)  # None until _decode stands the last codes in for it
        self.lost.append(packet is None)
        stop = self.n_packets - self.lookahead.decoder_ahead
        return self._out(self._decode(stop, final=False))

    def flush(self) -> np.ndarray:
        """The rest of the audio: the frames still waiting for packets that will not come."""
        if self.finished:
            return np.zeros(0, dtype=np.float32)
        self.finished = True
        d, hop = self.codec.downsample, self.codec.hop_length
        n_frames, length = self.n_packets * d, self.n_packets * d * hop - 1
        header = self.header
        if header is None:  # every packet was lost: silence
            return self._out(np.zeros(max(0, length - self.synthesiser.start), np.float32), True)
        wave = self._decode(self.n_packets, final=True)
        if header is not None and header.n_frames:  # a converted .vqc knows its length
            n_frames = min(n_frames, header.n_frames)
            model_length = round(header.length * header.sample_rate / header.orig_sample_rate)
            length = max(1, (n_frames - 1) * hop, min(model_length, n_frames * hop - 1))
        wave = np.concatenate([wave, self.synthesiser.finish(n_frames, length)])
        out = self._out(wave, last=True)
        if header is not None and header.length:  # the original length, when all arrived
            wanted = header.length - (self.emitted - len(out))
            complete = self.n_packets * d >= header.n_frames
            out = _fit(out, wanted) if complete else out[: max(0, wanted)]
        return out

    def _decode(self, stop: int, final: bool) -> np.ndarray:
        """Decode code frames ``[next_code, stop)`` and synthesise what they complete."""
        start = self.next_code
        if stop <= start or self.header is None:  # (no layout yet: only losses so far)
            return np.zeros(0, dtype=np.float32)
        la = self.lookahead
        # A lost packet's codes are its predecessor's (zeros at the start): the decoder network
        # needs some context; the concealer replaces the lost frames themselves.
        for i, codes in enumerate(self.codes):
            if codes is None:
                previous = self.codes[i - 1] if i else None
                zero = np.zeros(len(self.header.codebook_sizes), dtype=np.uint16)
                self.codes[i] = zero if previous is None else previous
        first = max(self.offset, start - la.decoder_back)
        codes = np.stack(self.codes[first - self.offset :], 1).astype(np.int64)
        with torch.inference_mode():
            window = self.codec.decode_window(torch.from_numpy(codes))  # L * d frames
            lost = self.lost[first - self.offset :]
            frames = self.concealer(window, lost, start - first, stop - first)
        self.next_code = stop
        keep = max(self.offset, stop - la.decoder_back)
        self.codes, self.lost = self.codes[keep - self.offset :], self.lost[keep - self.offset :]
        self.offset = keep
        return self.synthesiser.push(frames, hold=final)

    def _out(self, wave: np.ndarray, last: bool = False) -> np.ndarray:
        """Model-rate samples to the output: the encoder's gain undone, resampled."""
        if self.header is not None and self.header.gain_db:
            wave = wave * np.float32(10 ** (-self.header.gain_db / 20))
        if self.resampler is not None:
            wave = self.resampler.resample_chunk(wave.astype(np.float32), last=last)
        self.emitted += len(wave)
        return soft_limit(wave.astype(np.float32))  # as file decoding does


def check_stream(codec: Codec, header: StreamHeader) -> None:
    """Refuse a stream from another model, or one whose layout its model cannot decode."""
    if header.model_id != codec.model_id:
        raise VqkitError(
            f"the stream was made by model {header.model_id}, not this model "
            f"({codec.model_id}): decode with the --model it was encoded with"
        )
    n_stages = len(header.codebook_sizes) - len(codec.side)
    if (
        (header.sample_rate, header.hop_length, header.downsample)
        != (codec.sample_rate, codec.hop_length, codec.downsample)
        or not 1 <= n_stages <= codec.n_codebooks
        or header.codebook_sizes != codec.codebook_sizes(n_stages)
    ):
        raise VqkitError("the stream's header does not fit its model: the stream is damaged")


def _header_for(codec: Codec, packet_size: int) -> StreamHeader:
    """The header of a live stream at the model's rate whose packets have this size."""
    sizes = [codec.codebook_sizes(q) for q in range(1, codec.n_codebooks + 1)]
    fits = [k for k in sizes if packed_size(1, k) == packet_size]
    if len(fits) != 1:
        raise VqkitError(
            f"a {packet_size}-byte packet does not tell this model's stage count "
            f"({len(fits)} fit): pass the stream's header"
        )
    rate, hop = codec.sample_rate, codec.hop_length
    return StreamHeader(codec.model_id, rate, rate, hop, codec.downsample, 0, fits[0])


def _resampler(orig_sr: int, target_sr: int) -> soxr.ResampleStream | None:
    if orig_sr == target_sr:
        return None
    return soxr.ResampleStream(orig_sr, target_sr, 1, dtype="float32", quality="HQ")


def _fit(wave: np.ndarray, length: int) -> np.ndarray:
    """``wave`` cropped or zero-padded to ``length`` samples."""
    length = max(0, length)
    return np.pad(wave[:length], (0, max(0, length - len(wave))))
