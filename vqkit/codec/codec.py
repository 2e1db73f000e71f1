"""The speech codec: audio -> residual-VQ codes in a ``.vqc`` file -> audio.

Two model families are codecs. A spectrogram model (``stft`` or ``mel`` features) codes the
spectrogram and is heard through Griffin-Lim. A parametric model (``envelope`` features,
:mod:`vqkit.audio.envelope`) codes the spectral envelope, and its code frames also carry pitch and
voicing codes before the envelope stages (:func:`vqkit.codec.side.side_codebooks`), counted in
the bitrate; the harmonic-plus-noise synthesiser makes the waveform.

Encoding streams: audio is read in blocks, resampled to the model's rate by a streaming soxr
resampler, and the encoder runs on chunks of ``codec.chunk_seconds`` with margins of context that
cover its receptive field (:func:`vqkit.codec.realtime.reach_sides`) and are then discarded, so
the codes equal those of encoding the whole file at once. Decoding runs the decoder on chunks in
the same way and synthesises the waveform window by window with a crossfade
(:func:`vqkit.codec.stream.synthesise_chunked`). Memory is bounded by the chunk size, not the
length
of the recording. The output has the original sample rate and exactly the original length.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from vqkit.audio.envelope import EnvelopeFrontend
from vqkit.audio.frontends import make_frontend
from vqkit.audio.io import (
    BLOCK_FRAMES,
    MAX_SAMPLE_RATE,
    MIN_SAMPLE_RATE,
    as_samples,
    check_rate,
    exact_length,
    resample_stream,
)
from vqkit.audio.synthesis import Frames, make_synthesiser, postfilter
from vqkit.checkpoint import Checkpoint, load_checkpoint
from vqkit.codec.codefile import EncodedAudio, bits_per_code, read_code_file
from vqkit.codec.packets import StreamHeader
from vqkit.codec.realtime import Lookahead, StreamDecoder, StreamEncoder
from vqkit.codec.side import side_codebooks, side_codes, side_coding_of, side_from_codes
from vqkit.codec.stream import soft_limit, synthesise_chunked
from vqkit.config import Config, check_value
from vqkit.errors import VqkitError, shown
from vqkit.nn.normalise import Normaliser
from vqkit.run import resolve_model

CodeSource = EncodedAudio | bytes | bytearray | memoryview | str | os.PathLike
MAX_LEVEL_GAIN_DB = 60  # the level normalisation never scales by more than this
MAX_LEVEL_LOSS_DB = 40  # the level correction of decoding never scales by more than this


class Codec:
    """A trained discrete model as a speech codec (see :func:`load_codec`)."""

    def __init__(
        self, checkpoint: Checkpoint, chunk_seconds: float | None = None, beam: int | None = None
    ) -> None:
        config, model = checkpoint.config, checkpoint.model
        _check_model(config, model)
        self.checkpoint, self.config, self.model = checkpoint, config, model.eval()
        self.model_id = checkpoint.model_id
        self.sample_rate = config.audio.sample_rate
        self.frontend = make_frontend(config.features, self.sample_rate)
        self.normaliser = _normaliser(checkpoint)
        self.hop_length = self.frontend.hop_length
        self.downsample = model.downsample  # feature frames per code frame
        self.n_codebooks = model.bottleneck.n_codebooks
        self.codebook_size = model.bottleneck.codebook_size
        self.parametric = isinstance(self.frontend, EnvelopeFrontend)
        # the width in Hz each envelope point stands for, so the post-filter keeps the power
        self.bandwidths = self.frontend.spacing if self.parametric else None
        # pitch and voicing codebooks of the files this codec writes, before the envelope stages;
        # it reads files of every side coding (their rows say which)
        self.side_coding = config.codec.side_coding
        self.side = side_codebooks(self.downsample, self.side_coding) if self.parametric else ()
        seconds = config.codec.chunk_seconds if chunk_seconds is None else chunk_seconds
        self.chunk_codes = max(1, round(seconds * self.frame_rate))  # code frames per chunk
        self.beam = config.codec.beam if beam is None else beam  # paths of the stages' search
        check_value("codec.beam", self.beam, "--beam")

    @property
    def frame_rate(self) -> float:
        """Code frames per second."""
        return self.sample_rate / self.hop_length / self.downsample

    @property
    def bitrates(self) -> list[float]:
        """kbit/s of the codes with 1..n_codebooks stages: frame rate x (stages x bits + the
        pitch and voicing bits)."""
        bits, side = bits_per_code(self.codebook_size), sum(map(bits_per_code, self.side))
        return [self.frame_rate * (q * bits + side) / 1000 for q in range(1, self.n_codebooks + 1)]

    def codebook_sizes(self, n_stages: int) -> tuple[int, ...]:
        """Codebook sizes of the code rows in a file with ``n_stages`` envelope stages."""
        return self.side + (self.codebook_size,) * n_stages

    def side_layout(self, encoded: EncodedAudio) -> tuple[str | None, tuple[int, ...]]:
        """The side coding of ``encoded``'s first rows and their codebook sizes: ``("", ())``
        for a spectrogram model, ``(None, ())`` when the rows fit no coding."""
        if not self.parametric:
            return "", ()
        coding = side_coding_of(encoded.codebook_sizes, self.downsample)
        return coding, () if coding is None else side_codebooks(self.downsample, coding)

    def n_stages(self, bitrate: float | None) -> int:
        """The most stages whose bitrate is at most ``bitrate`` kbit/s (all when None)."""
        if bitrate is None:
            return self.n_codebooks
        if isinstance(bitrate, bool) or not isinstance(bitrate, numbers.Real):
            raise VqkitError(f"bitrate must be a number of kbit/s, got {shown(repr(bitrate))}")
        if not (math.isfinite(bitrate) and bitrate > 0):
            raise VqkitError(f"bitrate must be a positive number of kbit/s, got {bitrate:g}")
        fitting = [q for q, rate in enumerate(self.bitrates, 1) if rate <= bitrate * (1 + 1e-9)]
        if not fitting:
            raise VqkitError(
                f"bitrate {bitrate:g} kbit/s is below this model's lowest, "
                f"{self.bitrates[0]:.3f} kbit/s (1 stage)"
            )
        return fitting[-1]

    @functools.cached_property
    def margins(self) -> tuple[int, int]:
        """Context in code frames that the encoder and the decoder need on each side of a chunk."""
        d, la = self.downsample, self.lookahead
        reach = max(la.encoder_back, la.encoder_ahead)  # feature frames
        return math.ceil(reach / d) + 1, max(la.decoder_back, la.decoder_ahead) + 1

    def encode(
        self, wave: np.ndarray, sample_rate: int, bitrate: float | None = None
    ) -> EncodedAudio:
        """Encode mono ``wave`` ``(T,)`` at ``sample_rate`` with the most stages whose bitrate
        is at most ``bitrate`` kbit/s (all when None).

        ``wave`` is float (full scale 1.0) or integer PCM (scaled by its full scale: int16 by
        32768); ``sample_rate`` any whole number of Hz in 4..384 kHz. Everything is checked
        before anything is encoded."""
        sample_rate, n_stages = check_rate(sample_rate), self.n_stages(bitrate)
        wave = as_samples(wave)
        if wave.ndim != 1 or wave.size == 0:
            raise VqkitError(f"expected a non-empty mono waveform (T,), got {wave.shape}")
        blocks = [wave[i : i + BLOCK_FRAMES] for i in range(0, wave.size, BLOCK_FRAMES)]
        gain = self._gain(blocks)
        return self.encode_blocks(blocks, sample_rate, n_stages, gain)

    def encode_blocks(
        self, blocks: Iterable[np.ndarray], sample_rate: int, n_stages: int, gain_db: int = 0
    ) -> EncodedAudio:
        """Encode consecutive mono blocks ``(T_i,)`` at ``sample_rate``, applying ``gain_db``."""
        sample_rate = check_rate(sample_rate)
        length = [0]

        def counted() -> Iterator[np.ndarray]:
            for block in blocks:
                length[0] += len(block)
                yield block * np.float32(10 ** (gain_db / 20))

        waves = resample_stream(counted(), sample_rate, self.sample_rate)
        with torch.inference_mode():
            codes, n_samples, power = self._encode_stream(waves, n_stages)
        if self.parametric:  # the decoder also undoes the level the coded envelope loses
            loss_db = 10 * math.log10(max(power[0], 1e-30) / max(power[1], 1e-30))
            gain_db -= int(np.clip(round(loss_db), -MAX_LEVEL_LOSS_DB, MAX_LEVEL_LOSS_DB))
        return EncodedAudio(
            model_id=self.model_id,
            sample_rate=self.sample_rate,
            hop_length=self.hop_length,
            n_frames=self.frontend.n_frames(n_samples),
            length=length[0],
            orig_sample_rate=sample_rate,
            codebook_sizes=self.codebook_sizes(n_stages),
            codes=codes,
            gain_db=gain_db,
        )

    def decode(self, encoded: CodeSource, iters: int | None = None) -> np.ndarray:
        """Decode to mono ``(T,)`` float32 at the original sample rate and length.

        ``encoded`` is an :class:`EncodedAudio`, the bytes of a ``.vqc`` file, or its path."""
        return np.concatenate(list(self.decode_blocks(encoded, iters)))

    def decode_blocks(self, encoded: CodeSource, iters: int | None = None) -> Iterator[np.ndarray]:
        """Decode to consecutive blocks at the original sample rate, ``encoded.length`` in all.

        Checks that ``encoded`` fits this model at once; the work happens as blocks are taken.
        """
        encoded = as_encoded(encoded)
        self._check_encoded(encoded)
        n_frames, sr, osr = encoded.n_frames, self.sample_rate, encoded.orig_sample_rate
        # The model-rate length the encoder saw (soxr gives round(length * sr / osr) samples),
        # kept consistent with n_frames and at least one sample.
        hop = self.hop_length
        length = round(encoded.length * sr / osr)
        length = max(1, (n_frames - 1) * hop, min(length, n_frames * hop - 1))
        synthesiser = make_synthesiser(self.config.codec, self.frontend, iters)
        window = self.chunk_codes * self.downsample
        overlap = max(2, min(2 * math.ceil(self.frontend.n_fft / hop), window // 2))
        coding, side = self.side_layout(encoded)
        frames = self._decode_frames(encoded.codes, n_frames, coding, len(side))
        scale = np.float32(10 ** (-encoded.gain_db / 20))
        waves = synthesise_chunked(synthesiser, frames, n_frames, length, window, overlap)
        waves = (wave * scale for wave in waves)
        waves = exact_length(resample_stream(waves, sr, osr), encoded.length)
        return (soft_limit(wave) for wave in waves)

    def _gain(self, blocks: Iterable[np.ndarray]) -> int:
        """Whole-dB gain bringing the RMS level to ``codec.level_db`` (0 when that is 0)."""
        target = self.config.codec.level_db
        if target == 0:
            return 0
        energy, count = 0.0, 0
        for block in blocks:
            energy += float(np.dot(block.astype(np.float64), block))
            count += len(block)
        level = 10 * math.log10(max(energy / max(count, 1), 1e-12))
        return int(np.clip(round(target - level), -MAX_LEVEL_GAIN_DB, MAX_LEVEL_GAIN_DB))

    def _encode_stream(
        self, waves: Iterator[np.ndarray], n_stages: int
    ) -> tuple[np.ndarray, int, np.ndarray]:
        """Codes ``(Q, N')`` of a model-rate sample stream, chunk by chunk; its length; and the
        power of its envelope and of the envelope decoded from those codes ``(2,)``
        (:meth:`_powers`; zeros for a spectrogram model)."""
        d, hop, margin, la = self.downsample, self.hop_length, self.margins[0], self.lookahead
        power = np.zeros(2)
        buffer, offset, total = np.zeros(0, dtype=np.float32), 0, None
        chunks, start = [], 0
        while True:
            stop = start + self.chunk_codes
            first, last = max(0, (start - margin) * d), (stop + margin) * d  # feature frames
            needed = la.analysis_end(last)
            while total is None and offset + len(buffer) < needed:
                block = next(waves, None)
                if block is None:
                    total = offset + len(buffer)
                else:
                    buffer = np.concatenate([buffer, block])
            if total is not None:
                n_frames = self.frontend.n_frames(total)
                if start >= math.ceil(n_frames / d):
                    break
                stop, last = min(stop, math.ceil(n_frames / d)), min(last, n_frames)
            begin = la.analysis_start(first)
            buffer, offset = buffer[begin - offset :], begin
            wave = torch.from_numpy(buffer[: needed - begin])[None]
            frames = slice(first - begin // hop, last - begin // hop)
            own = slice(start - first // d, stop - first // d)  # this chunk's code frames
            codes, envelope = self._encode_window(wave, frames, n_stages)
            if self.parametric:
                power += self._powers(envelope, codes[len(self.side) :], own)
            # uint16 at once (codebooks hold at most 65536 codes): a quarter of int64's memory
            chunks.append(codes[:, own].numpy().astype(np.uint16))
            start = stop
        return np.concatenate(chunks, axis=1), total, power

    def _powers(self, envelope: Tensor, codes: Tensor, own: slice) -> np.ndarray:
        """The summed power of the frames of code frames ``own`` in ``envelope`` (dB, ``(1, K,
        N)``) and in the envelope decoded from ``codes`` ``(Q, N')`` (before the post-filter,
        which keeps the power): ``(2,)``. The decoded envelope is a smoothed mean in dB, so on
        speech unlike the training data it comes back quieter (1-2 dB at 3-4 stages)."""
        x_hat = self.model.decode(codes[None], envelope.shape[-1])
        x_hat = self.normaliser.denormalise(x_hat, x_hat.new_zeros(1, 0))
        frames = slice(own.start * self.downsample, own.stop * self.downsample)
        weights = self.bandwidths[:, None]
        return np.array(
            [float((weights * 10 ** (x[0, :, frames] / 10)).sum()) for x in (envelope, x_hat)]
        )

    def _decode_frames(
        self, codes: np.ndarray, n_frames: int, coding: str | None, n_side: int
    ) -> Iterator[Frames]:
        """The frames (:meth:`decode_window`) of codes ``(Q, N')`` (uint16) whose first ``n_side``
        rows are side codes in ``coding``, chunk by chunk, ``n_frames`` in all. Each chunk's codes
        become int64 only when it is decoded."""
        d, margin, n_codes = self.downsample, self.margins[1], codes.shape[1]
        for start in range(0, n_codes, self.chunk_codes):
            stop = min(start + self.chunk_codes, n_codes)
            first, last = max(0, start - margin), min(n_codes, stop + margin)
            chunk = torch.from_numpy(codes[:, first:last].astype(np.int64))
            with torch.inference_mode():
                frames = self.decode_window(chunk, coding, n_side)
            yield frames[(start - first) * d : min(stop * d, n_frames) - first * d]

    def encode_window(self, wave: Tensor, frames: slice, n_stages: int) -> Tensor:
        """Codes ``(Q, L)`` of the feature frames ``frames`` (from a code frame's first) of a
        model-rate window ``(1, T)``: a parametric model's pitch and voicing rows first."""
        return self._encode_window(wave, frames, n_stages)[0]

    def _encode_window(self, wave: Tensor, frames: slice, n_stages: int) -> tuple[Tensor, Tensor]:
        """:meth:`encode_window`'s codes, and the features in dB ``(1, F, L * downsample)`` they
        code."""
        if self.parametric:
            features, f0, voiced = self.frontend.analyse(wave)
        else:
            features = self.frontend(wave)
        features = features[..., frames]
        x = self.normaliser.normalise(features)
        codes = self.model.encode(x, n_stages, self.beam)[0]  # (Q, L)
        if self.parametric:  # the pitch and voicing rows go first
            side = side_codes(f0[:, frames], voiced[:, frames], self.downsample, self.side_coding)
            codes = torch.cat([side[0], codes])
        return codes, features

    def decode_window(
        self, codes: Tensor, coding: str | None = None, n_side: int | None = None
    ) -> Frames:
        """The frames of consecutive code frames ``(Q, L)`` whose first ``n_side`` rows are side
        codes in ``coding`` (default: this codec's own): features in dB ``(F, L * downsample)``
        and, for a parametric model, F0 (Hz) and voicing ``(L * downsample,)``."""
        n_side = len(self.side) if n_side is None else n_side
        side, codes = codes[:n_side], codes[n_side:]
        x_hat = self.model.decode(codes[None])
        no_side = x_hat.new_zeros(1, 0)  # meanstd and none need no side information
        x_hat = self.normaliser.denormalise(x_hat, no_side)[0]
        x_hat = postfilter(x_hat, self.config.codec.postfilter, self.bandwidths)
        if not self.parametric:
            return Frames(x_hat)
        coding = self.side_coding if coding is None else coding
        causal = self.lookahead.decoder_ahead == 0  # its stream waits for no later packet
        f0, voiced = side_from_codes(side[None], self.downsample, x_hat.shape[-1], coding, causal)
        return Frames(x_hat, f0[0], voiced[0])

    @functools.cached_property
    def lookahead(self) -> Lookahead:
        """What real-time coding waits for at each stage, measured from the model."""
        return Lookahead(self)

    @property
    def latency_ms(self) -> float:
        """The algorithmic delay of real-time coding: a packet, the analysis and the networks'
        lookahead, and the synthesis window (:meth:`Lookahead.latency_samples`)."""
        return 1000 * self.lookahead.latency_samples() / self.sample_rate

    def stream_encoder(
        self, bitrate: float | None = None, sample_rate: int | None = None, gain_db: int = 0
    ) -> StreamEncoder:
        """A real-time encoder of mono PCM at ``sample_rate`` (the model's by default):
        ``push(pcm)`` and ``flush()`` return packets; ``header`` is the stream's header."""
        rate = self.sample_rate if sample_rate is None else sample_rate
        check_rate(rate)
        return StreamEncoder(self, self.n_stages(bitrate), rate, gain_db)

    def stream_decoder(
        self, header: bytes | StreamHeader | None = None, sample_rate: int | None = None
    ) -> StreamDecoder:
        """A real-time decoder: ``push(packet)`` (``None``: lost) and ``flush()`` return audio
        at ``sample_rate`` (by default the stream's). Without a header the stage count comes
        from the first packet's size and the audio is at the model's rate."""
        if isinstance(header, (bytes, bytearray)):
            header = StreamHeader.from_bytes(bytes(header))
        return StreamDecoder(self, header, sample_rate)

    def _check_encoded(self, encoded: EncodedAudio) -> None:
        if encoded.model_id != self.model_id:
            raise VqkitError(
                f"the code file was made by model '{shown(encoded.model_id)}', not this model "
                f"({self.model_id}): decode with the --model it was encoded with"
            )
        expected = math.ceil(encoded.n_frames / self.downsample)
        coding, side = self.side_layout(encoded)
        n_stages = encoded.n_stages - len(side)
        if (
            (encoded.sample_rate, encoded.hop_length) != (self.sample_rate, self.hop_length)
            or coding is None
            or not 0 < n_stages <= self.n_codebooks
            or encoded.codebook_sizes != side + (self.codebook_size,) * n_stages
            or encoded.codes.shape[1] != expected
        ):
            raise VqkitError(
                "the code file's header does not fit its model (rate, hop, stages, codebook "
                "sizes or frame counts differ): the file is damaged"
            )


def load_codec(
    model: str | os.PathLike = "default",
    chunk_seconds: float | None = None,
    beam: int | None = None,
) -> Codec:
    """The codec of ``model``: "default" (shipped), a run folder or a checkpoint file; ``None``
    keeps the model's ``codec.chunk_seconds`` and ``codec.beam``."""
    return Codec(load_checkpoint(resolve_model(model)), chunk_seconds, beam)


def as_encoded(source: CodeSource) -> EncodedAudio:
    """An :class:`EncodedAudio` as it is; the bytes of a ``.vqc`` file parsed; a path read."""
    if isinstance(source, EncodedAudio):
        return source
    if isinstance(source, bytes | bytearray | memoryview):
        return EncodedAudio.from_bytes(bytes(source))
    if isinstance(source, str | os.PathLike):
        return read_code_file(source)[0]
    raise VqkitError(
        f"expected EncodedAudio, the bytes of a .vqc file or its path, got {type(source).__name__}"
    )


def _check_model(config: Config, model: nn.Module) -> None:
    if not getattr(model.bottleneck, "discrete", False):
        kind = config.bottleneck.kind
        raise VqkitError(f"a codec needs a discrete bottleneck (vq, rvq or fsq), not '{kind}'")
    if config.model.kind != "conv1d":
        raise VqkitError(
            f"the codec needs a conv1d model (codes over time), not {config.model.kind}"
        )
    if config.features.kind not in ("stft", "mel", "envelope"):
        raise VqkitError(f"features.kind '{config.features.kind}' cannot be turned back into audio")
    if bits_per_code(model.bottleneck.codebook_size) > 16:
        raise VqkitError("the code file holds codebooks of at most 65536 entries")
    if not MIN_SAMPLE_RATE <= config.audio.sample_rate <= MAX_SAMPLE_RATE:
        raise VqkitError(
            f"the model's audio.sample_rate {config.audio.sample_rate} Hz is outside "
            f"{MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz"
        )


def _normaliser(checkpoint: Checkpoint) -> Normaliser:
    normaliser = checkpoint.model.normaliser
    if normaliser.n_side:
        raise VqkitError(
            f"the codec needs features.normalise 'meanstd' or 'none', not '{normaliser.kind}' "
            "(per-utterance min-max values are side information it does not carry)"
        )
    return normaliser
