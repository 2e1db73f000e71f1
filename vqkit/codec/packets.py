"""The packet stream: a short binary header, then one fixed-size packet per code frame.

For live links (pipes, sockets, radio modems) where a ``.vqc`` file, whose header needs the
length, cannot be written before the audio ends. Layout, integers little-endian::

    offset  size  field
    0       4     magic b"VQKS"
    4       1     format version (1)
    5       2     header size H in bytes, this prefix and the CRC included (uint16)
    7       8     model id (the 16 hex digits of the .vqc ``id``, as 8 bytes)
    15      4     model sample rate, Hz (uint32)
    19      4     sample rate of the PCM the stream was made from and decodes to, Hz (uint32)
    23      2     hop length, samples at the model rate per feature frame (uint16)
    25      2     feature frames per code frame (uint16)
    27      1     gain in whole dB the encoder applied (int8)
    28      1     code rows per packet Q (uint8)
    29      2Q    codebook size minus one of each row (uint16 each)
    29+2Q   8     feature frames n, 0 when unknown (a live stream; uint64)
    37+2Q   8     original length in samples at the PCM rate, 0 when unknown (uint64)
    45+2Q   4     CRC32 (zlib) of the header bytes before it

then packets of ``ceil(sum(bits) / 8)`` bytes each: one code frame, its rows bit-packed exactly
as a ``.vqc`` file packs a frame (:func:`vqkit.codefile.pack_codes`, zero bits pad the last byte).
A parametric model's rows are its pitch and voicing codes, then the envelope stages, so a
packet's size follows from the codebook sizes alone. Packets carry no checksum (a bit spent per
packet is 25 bit/s); a decoder catches codes outside their codebook and non-zero padding bits.

Numpy only, like :mod:`vqkit.codefile`.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from vqkit.codec.codefile import (
    EncodedAudio,
    pack_codes,
    packed_size,
    unpack_codes,
)
from vqkit.errors import VqkitError

STREAM_MAGIC = b"VQKS"
STREAM_VERSION = 1
_PREFIX = struct.Struct("<4sBH")  # magic, version, header size
_FIELDS = struct.Struct("<8sIIHHbB")  # id, sr, osr, hop, frames per code frame, gain, rows
_TAIL = struct.Struct("<QQ")  # feature frames, original length (0: unknown)
_CRC = struct.Struct("<I")
MAX_HEADER = _PREFIX.size + _FIELDS.size + 2 * 255 + _TAIL.size + _CRC.size


@dataclass(frozen=True)
class StreamHeader:
    """What a decoder needs before the first packet; ``n_frames`` and ``length`` are 0 for a
    live stream, whose end nobody knew when the header was written."""

    model_id: str  # 16 hex digits
    sample_rate: int  # the model's rate, Hz
    orig_sample_rate: int  # the PCM's rate, Hz
    hop_length: int
    downsample: int  # feature frames per code frame (packet)
    gain_db: int
    codebook_sizes: tuple[int, ...]  # one per code row
    n_frames: int = 0
    length: int = 0

    @property
    def packet_size(self) -> int:
        """Bytes per packet: one code frame's rows, bit-packed and padded to a byte."""
        return packed_size(1, self.codebook_sizes)

    @property
    def frame_samples(self) -> int:
        """Model-rate samples per packet."""
        return self.hop_length * self.downsample

    @property
    def kbps(self) -> float:
        """kbit/s of the packets, padding included."""
        return self.packet_size * 8 * self.sample_rate / self.frame_samples / 1000

    def to_bytes(self) -> bytes:
        try:
            model_id = bytes.fromhex(self.model_id)
        except ValueError:
            model_id = b""
        if len(model_id) != 8:
            raise VqkitError(
                f"a packet stream needs a 16-hex-digit model id, not {self.model_id!r}"
            )
        sizes = struct.pack(f"<{len(self.codebook_sizes)}H", *(k - 1 for k in self.codebook_sizes))
        body = _FIELDS.pack(
            model_id,
            self.sample_rate,
            self.orig_sample_rate,
            self.hop_length,
            self.downsample,
            self.gain_db,
            len(self.codebook_sizes),
        )
        body += sizes + _TAIL.pack(self.n_frames, self.length)
        head = _PREFIX.pack(STREAM_MAGIC, STREAM_VERSION, _PREFIX.size + len(body) + _CRC.size)
        return head + body + _CRC.pack(zlib.crc32(head + body))

    @classmethod
    def from_bytes(cls, data: bytes) -> StreamHeader:
        """Parse a complete header (:func:`header_size` says how long it is)."""
        size = header_size(data)
        if len(data) != size:
            raise VqkitError(f"truncated packet stream header ({len(data)} of {size} bytes)")
        if zlib.crc32(data[: -_CRC.size]) != _CRC.unpack_from(data, size - _CRC.size)[0]:
            raise VqkitError("corrupt packet stream header: CRC mismatch")
        fields = _FIELDS.unpack_from(data, _PREFIX.size)
        model_id, sr, osr, hop, factor, gain, n_rows = fields
        offset = _PREFIX.size + _FIELDS.size
        if size != offset + 2 * n_rows + _TAIL.size + _CRC.size:
            raise VqkitError("corrupt packet stream header: its size does not fit its rows")
        sizes = struct.unpack_from(f"<{n_rows}H", data, offset)
        n_frames, length = _TAIL.unpack_from(data, offset + 2 * n_rows)
        if not (n_rows and sr and osr and hop and factor) or (n_frames == 0) != (length == 0):
            raise VqkitError("corrupt packet stream header: a field is zero")
        return cls(
            model_id.hex(),
            sr,
            osr,
            hop,
            factor,
            gain,
            tuple(k + 1 for k in sizes),
            n_frames,
            length,
        )


def header_size(prefix: bytes) -> int:
    """The header's size from its first 7 bytes; checks the magic and the version."""
    if prefix[: len(STREAM_MAGIC)] != STREAM_MAGIC[: len(prefix)]:
        raise VqkitError("not a vqkit packet stream or code file (wrong magic bytes)")
    if len(prefix) < _PREFIX.size:
        raise VqkitError(f"truncated packet stream header ({len(prefix)} bytes)")
    _, version, size = _PREFIX.unpack_from(prefix)
    if version != STREAM_VERSION:
        newer = ": upgrade vqkit" if version > STREAM_VERSION else ""
        raise VqkitError(f"packet stream version {version} is not {STREAM_VERSION}{newer}")
    if not _PREFIX.size + _FIELDS.size + _TAIL.size + _CRC.size < size <= MAX_HEADER:
        raise VqkitError(f"corrupt packet stream header: size {size}")
    return size


def pack_packet(codes: np.ndarray, codebook_sizes: tuple[int, ...]) -> bytes:
    """One code frame ``(Q,)`` as a packet."""
    return pack_codes(np.asarray(codes).reshape(-1, 1), codebook_sizes)


def unpack_packet(packet: bytes, codebook_sizes: tuple[int, ...]) -> np.ndarray:
    """Codes ``(Q,)`` of one packet; :class:`VqkitError` when it cannot be a packet."""
    return unpack_codes(bytes(packet), codebook_sizes, 1)[:, 0]


def read_header(source: BinaryIO, prefix: bytes = b"") -> StreamHeader:
    """Read a stream's header from a binary file object (``prefix``: its first bytes, already
    read)."""
    prefix += read_exactly(source, _PREFIX.size - len(prefix))
    return StreamHeader.from_bytes(prefix + read_exactly(source, header_size(prefix) - len(prefix)))


def read_exactly(source: BinaryIO, size: int) -> bytes:
    """Up to ``size`` bytes, fewer only at the end of the input (a pipe may return less)."""
    chunks, count = [], 0
    while count < size:
        chunk = source.read(size - count)
        if not chunk:
            break
        chunks.append(chunk)
        count += len(chunk)
    return b"".join(chunks)


class PacketReader:
    """The packets of a stream from a binary file object, its header already read. A header met
    where a packet should start (streams joined end to end, as ``cat a.vqs b.vqs`` makes) is
    recognised by its magic, version and CRC and given instead of a packet; the packet size
    then follows it."""

    def __init__(self, source: BinaryIO, header: StreamHeader) -> None:
        self.source, self.size, self.pending = source, header.packet_size, b""

    def __iter__(self) -> Iterator[bytes | StreamHeader]:
        """Packets (the last one short if the input ends inside it) and headers, in order."""
        while packet := self._read(self.size):
            header = self._header(packet)
            if header is None:
                yield packet
            else:
                self.size = header.packet_size
                yield header

    def _read(self, size: int) -> bytes:
        data, self.pending = self.pending[:size], self.pending[size:]
        return data + read_exactly(self.source, size - len(data))

    def _header(self, packet: bytes) -> StreamHeader | None:
        """The header that starts at ``packet``, whose bytes it then consumes; else None."""
        if packet[: len(STREAM_MAGIC)] != STREAM_MAGIC:
            return None
        data = packet + self._read(max(0, _PREFIX.size - len(packet)))
        try:
            size = header_size(data[: _PREFIX.size])
            data += self._read(max(0, size - len(data)))
            header = StreamHeader.from_bytes(data[:size])
        except VqkitError:  # packet bytes that happen to start like a header
            self.pending = data[len(packet) :] + self.pending
            return None
        self.pending = data[size:] + self.pending
        return header


def stream_to_encoded(header: StreamHeader, packets: bytes) -> EncodedAudio:
    """A complete packet stream (its packets joined) as a ``.vqc`` recording. A live stream's
    length becomes the whole of its last packet."""
    size = header.packet_size
    if len(packets) % size or not packets:
        raise VqkitError(
            f"the packet stream holds {len(packets)} bytes of packets, not a positive "
            f"multiple of its packet size {size}"
        )
    n_codes = len(packets) // size
    frames = np.frombuffer(packets, dtype=np.uint8).reshape(n_codes, size)
    codes = np.stack([unpack_packet(f.tobytes(), header.codebook_sizes) for f in frames], 1)
    n_frames, length = header.n_frames, header.length
    if not n_frames:  # a live stream: its decoder makes n * hop - 1 samples at the model rate
        n_frames = n_codes * header.downsample
        model_length = n_frames * header.hop_length - 1
        length = max(1, round(model_length * header.orig_sample_rate / header.sample_rate))
    if -(-n_frames // header.downsample) != n_codes:
        raise VqkitError(f"the stream's header counts {n_frames} frames, its packets {n_codes}")
    return EncodedAudio(
        model_id=header.model_id,
        sample_rate=header.sample_rate,
        hop_length=header.hop_length,
        n_frames=n_frames,
        length=length,
        orig_sample_rate=header.orig_sample_rate,
        codebook_sizes=header.codebook_sizes,
        codes=codes,
        gain_db=header.gain_db,
    )


def encoded_to_stream(encoded: EncodedAudio, downsample: int) -> bytes:
    """A ``.vqc`` recording as a packet stream (header and packets); ``downsample`` is its
    model's feature frames per code frame."""
    header = StreamHeader(
        model_id=encoded.model_id,
        sample_rate=encoded.sample_rate,
        orig_sample_rate=encoded.orig_sample_rate,
        hop_length=encoded.hop_length,
        downsample=downsample,
        gain_db=encoded.gain_db,
        codebook_sizes=encoded.codebook_sizes,
        n_frames=encoded.n_frames,
        length=encoded.length,
    )
    packets = (pack_packet(column, header.codebook_sizes) for column in encoded.codes.T)
    return header.to_bytes() + b"".join(packets)
