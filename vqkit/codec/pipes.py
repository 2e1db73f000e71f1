"""The command line's live side: raw PCM and packet streams through pipes or files.

``vqkit encode - OUT`` reads raw PCM from standard input and ``vqkit encode IN -`` writes a
packet stream (:mod:`vqkit.packets`) to standard output, a packet as soon as it is complete;
``vqkit decode IN OUT`` takes a ``.vqc`` file or a packet stream (told apart by their magic) and
writes raw PCM to ``-`` or a WAV/FLAC file, packet by packet. ``vqkit convert`` turns a ``.vqc``
into a stream and back. The functions take open binary file objects for ``-`` (the CLI passes
standard input and output), so nothing here reads ``sys``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf

from vqkit.audio.io import open_audio_blocks
from vqkit.codec.codec import load_codec
from vqkit.codec.codefile import MAGIC, EncodedAudio
from vqkit.codec.packets import (
    STREAM_MAGIC,
    PacketReader,
    StreamHeader,
    encoded_to_stream,
    header_size,
    read_exactly,
    read_header,
    stream_to_encoded,
)
from vqkit.codec.realtime import StreamDecoder, check_stream
from vqkit.errors import VqkitError
from vqkit.files import atomic_path, atomic_write_bytes
from vqkit.run import model_for_codes, model_for_rate

RAW_FORMATS = {"s16le": "<i2", "s32le": "<i4", "f32le": "<f4"}  # --format: raw PCM layouts
READ_BYTES = 4096  # at most this much raw PCM is taken from a pipe at a time

Target = str | os.PathLike | BinaryIO


def encode_stream(
    source: Target,
    sink: Target,
    model: str | os.PathLike = "default",
    bitrate: float | None = None,
    sample_rate: int | None = None,
    raw_format: str = "s16le",
    gain_db: int | None = None,
    beam: int | None = None,
) -> str:
    """Encode raw PCM (a binary file object) or an audio file to a packet stream written to a
    binary file object or a file; returns a one-line summary. ``gain_db`` defaults to the
    file's level gain for a file and 0 for raw PCM, whose level nobody knows in advance.
    ``"default"`` codes 8 kHz input with the shipped narrowband model; ``beam`` overrides the
    model's ``codec.beam``."""
    if isinstance(source, (str, os.PathLike)):
        rate, blocks = open_audio_blocks(source)
        codec = load_codec(model_for_rate(model, rate), beam=beam)
        if gain_db is None:
            level = codec.config.codec.level_db
            gain_db = codec._gain(open_audio_blocks(source)[1]) if level else 0
    else:
        model = model if sample_rate is None else model_for_rate(model, sample_rate)
        codec = load_codec(model, beam=beam)
        rate = codec.sample_rate if sample_rate is None else sample_rate
        blocks = read_pcm(source, raw_format)
    n_stages = codec.n_stages(bitrate)
    encoder = codec.stream_encoder(bitrate, sample_rate=rate, gain_db=gain_db or 0)
    count = 0
    with _output(sink) as out, _pipe_closed():
        out.write(encoder.header.to_bytes())
        out.flush()
        for block in blocks:
            for packet in encoder.push(block):
                out.write(packet)
                count += 1
            out.flush()
        for packet in encoder.flush():
            out.write(packet)
            count += 1
        out.flush()
        if count == 0:
            raise VqkitError(f"{_name(source)}: no audio samples")
    header = encoder.header
    return (
        f"{_name(sink)}: {count} packets of {header.packet_size} bytes, {n_stages} stages, "
        f"{header.kbps:.3f} kbit/s, {codec.latency_ms:.0f} ms algorithmic delay"
    )


def decode_stream(
    source: Target,
    sink: Target,
    model: str | os.PathLike = "default",
    raw_format: str = "s16le",
    conceal: bool = False,
) -> str:
    """Decode a packet stream or a ``.vqc`` file to raw PCM (a binary file object) or a WAV /
    FLAC file, writing each packet's audio as it is decoded. A bad or cut packet is an error
    after everything before it is written, or with ``conceal`` a lost packet."""
    with ExitStack() as stack:
        src = _input(source, stack)
        magic = read_exactly(src, len(MAGIC))
        if magic == MAGIC:
            return _decode_file(magic + src.read(), sink, model, raw_format)
        header = read_header(src, magic)
        codec = load_codec(model_for_codes(model, header.model_id))
        check_stream(codec, header)
        decoder = codec.stream_decoder(header)
        with _audio_output(sink, decoder.sample_rate, raw_format) as write, _pipe_closed():
            notes = _decode_packets(src, header, decoder, write, conceal)
    return f"{_name(sink)}: {notes}"


def convert_codes(source: Target, sink: Target, model: str | os.PathLike = "default") -> str:
    """A ``.vqc`` file to a packet stream, or a complete stream to a ``.vqc`` file, without
    loss: the codes, rates and gain, and the length when the stream knows it (a live stream's
    length is its whole last packet). The model (its frames per packet) is needed one way."""
    with ExitStack() as stack:
        data = _input(source, stack).read()
    if data[: len(MAGIC)] == MAGIC:
        encoded = EncodedAudio.from_bytes(data)
        codec = load_codec(model_for_codes(model, encoded.model_id))
        codec._check_encoded(encoded)
        out, kind = encoded_to_stream(encoded, codec.downsample), "packet stream"
    elif data[: len(STREAM_MAGIC)] == STREAM_MAGIC:
        header = StreamHeader.from_bytes(data[: header_size(data)])
        encoded = stream_to_encoded(header, data[header_size(data) :])
        out, kind = encoded.to_bytes(), ".vqc file"
    else:
        raise VqkitError(f"{_name(source)}: not a vqkit code file or packet stream (wrong magic)")
    if isinstance(sink, (str, os.PathLike)):
        atomic_write_bytes(sink, out)
    else:
        with _pipe_closed():
            sink.write(out)
            sink.flush()
    return f"{_name(sink)}: {kind}, {encoded.codes.shape[1]} code frames, {len(out)} bytes"


def read_pcm(source: BinaryIO, raw_format: str = "s16le") -> Iterator[np.ndarray]:
    """Mono float32 blocks of raw PCM from a binary file object, as soon as they arrive."""
    if raw_format not in RAW_FORMATS:
        raise VqkitError(f"unknown raw format '{raw_format}'; valid: {', '.join(RAW_FORMATS)}")
    dtype = np.dtype(RAW_FORMATS[raw_format])
    scale = 1.0 if dtype.kind == "f" else 1.0 / 2 ** (8 * dtype.itemsize - 1)
    read = getattr(source, "read1", source.read)  # a pipe: whatever is there, without waiting
    rest = b""
    while chunk := read(READ_BYTES):
        data = rest + chunk
        whole = len(data) - len(data) % dtype.itemsize
        rest = data[whole:]
        if whole:
            yield (np.frombuffer(data[:whole], dtype=dtype) * scale).astype(np.float32)
    if rest:
        raise VqkitError(f"raw {raw_format} input ends in the middle of a sample")


def is_stream(path: str | os.PathLike) -> bool:
    """Whether a regular file starts like a packet stream (a FIFO or device is not opened: the
    peek would block on it or consume what it holds)."""
    if not Path(path).is_file():
        return False
    try:
        with open(path, "rb") as f:
            return f.read(len(STREAM_MAGIC)) == STREAM_MAGIC
    except OSError:
        return False


def _decode_packets(
    src: BinaryIO, header: StreamHeader, decoder: StreamDecoder, write, conceal: bool
) -> str:
    """Push every packet of ``src`` through ``decoder`` and ``write`` what comes out. Streams
    joined end to end decode as one when they fit the same decoder (model and layout)."""
    n_good, n_concealed = 0, 0
    for item in PacketReader(src, header):
        index = n_good + n_concealed
        if isinstance(item, StreamHeader):
            if _layout(item) != _layout(header):
                write(decoder.flush())
                raise VqkitError(
                    f"a stream of another model or bitrate follows packet {index}: decoded up "
                    "to it (decode that stream on its own)"
                )
            decoder.header = replace(item, n_frames=0, length=0)  # its gain from now on
            continue
        if len(item) < header.packet_size:
            problem = f"the stream ends {len(item)} bytes into packet {index}"
        else:
            try:
                write(decoder.push(item))
                n_good += 1
                continue
            except VqkitError as e:
                problem = f"packet {index} does not belong to this stream ({e})"
        if not conceal:
            write(decoder.flush())
            raise VqkitError(f"{problem}; decoded up to it (--conceal conceals bad packets)")
        write(decoder.push(None))
        n_concealed += 1
    write(decoder.flush())
    seconds = (n_good + n_concealed) * header.frame_samples / header.sample_rate
    concealed = f", {n_concealed} concealed" if n_concealed else ""
    return f"{n_good} packets decoded{concealed}, {seconds:.2f} s at {decoder.sample_rate} Hz"


def _layout(header: StreamHeader) -> tuple:
    """What must match for packets to go through the same decoder."""
    return (header.model_id, header.sample_rate, header.orig_sample_rate) + (
        header.hop_length,
        header.downsample,
        header.codebook_sizes,
    )


def _decode_file(data: bytes, sink: Target, model: str | os.PathLike, raw_format: str) -> str:
    encoded = EncodedAudio.from_bytes(data)
    codec = load_codec(model_for_codes(model, encoded.model_id))
    blocks = codec.decode_blocks(encoded)
    with _audio_output(sink, encoded.orig_sample_rate, raw_format) as write, _pipe_closed():
        for block in blocks:
            write(block)
    return f"{_name(sink)}: {encoded.duration:.2f} s at {encoded.orig_sample_rate} Hz"


@contextlib.contextmanager
def _audio_output(sink: Target, sample_rate: int, raw_format: str) -> Iterator:
    """A function writing mono float blocks to raw PCM (a binary file object, flushed at each
    block) or to a WAV / FLAC file (written atomically)."""
    if not isinstance(sink, (str, os.PathLike)):
        if raw_format not in RAW_FORMATS:
            raise VqkitError(f"unknown raw format '{raw_format}'; valid: {', '.join(RAW_FORMATS)}")
        dtype = np.dtype(RAW_FORMATS[raw_format])

        def write_raw(block: np.ndarray) -> None:
            block = np.clip(block, -1.0, 1.0)
            if dtype.kind != "f":
                block = np.round(block * (2 ** (8 * dtype.itemsize - 1) - 1))
            sink.write(block.astype(dtype).tobytes())
            sink.flush()

        yield write_raw
        return
    path = Path(sink)
    audio_format = {".wav": "WAV", ".flac": "FLAC"}.get(path.suffix.lower())
    if audio_format is None:
        raise VqkitError(f"{path}: output must end in .wav or .flac, or be - for raw PCM")
    with (
        atomic_path(path) as tmp,
        sf.SoundFile(str(tmp), "w", sample_rate, 1, "PCM_16", format=audio_format) as f,
    ):
        yield lambda block: f.write(np.clip(block, -1.0, 1.0))


@contextlib.contextmanager
def _output(sink: Target) -> Iterator[BinaryIO]:
    """A binary file object as is, or a file written atomically."""
    if not isinstance(sink, (str, os.PathLike)):
        yield sink
        return
    with atomic_path(sink) as tmp, open(tmp, "wb") as f:
        yield f


def _input(source: Target, stack: ExitStack) -> BinaryIO:
    if not isinstance(source, (str, os.PathLike)):
        return source
    try:
        return stack.enter_context(open(source, "rb"))
    except OSError as e:
        raise VqkitError(f"cannot read {source}: {e.strerror or e}") from None


@contextlib.contextmanager
def _pipe_closed() -> Iterator[None]:
    try:
        yield
    except BrokenPipeError:
        raise VqkitError("the output pipe was closed") from None


def _name(target: Target) -> str:
    return str(target) if isinstance(target, (str, os.PathLike)) else "-"
