"""The ``.vqc`` code file: a small JSON header and bit-packed residual-VQ codes, CRC-checked.

Layout (all integers little-endian)::

    offset  size  field
    0       4     magic b"VQKC"
    4       1     format version (1)
    5       2     header size H in bytes (uint16)
    7       H     header: compact UTF-8 JSON object (keys below)
    7+H     P     codes, bit-packed: frame by frame, stage by stage, each code in
                  ceil(log2 codebook_size) bits, most significant bit first; zero bits pad the
                  last byte. P = ceil(t * sum(bits) / 8)
    7+H+P   4     CRC32 (zlib) of every byte before it

Header keys: ``id`` model id (16 hex digits), ``sr`` model sample rate (Hz), ``hop`` hop length
(samples at ``sr``), ``n`` feature frames, ``t`` code frames, ``len`` original length (samples
at ``osr``), ``osr`` original sample rate, ``q`` code rows stored, ``k`` codebook size (one
int for all rows, or a list of ``q``), and optionally ``g``, a gain in whole dB that the
decoder divides out (side information; absent means 0): the level normalisation the encoder
applied, less the level a parametric model's coded envelope loses. A spectrogram model's rows
are its residual stages; a parametric model's first rows are its pitch and voicing codes
(:func:`vqkit.codec.side.side_codebooks`), then its envelope stages.

This module is numpy only: it reads and writes bytes and never needs the model.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from vqkit.audio.io import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE
from vqkit.errors import VqkitError, shown
from vqkit.files import check_readable

MAGIC = b"VQKC"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<4sBH")  # magic, version, header size
_CRC = struct.Struct("<I")
MIN_CODEBOOK_SIZE = 2
MAX_CODEBOOK_SIZE = 65536
MAX_STAGES = 64
MAX_DOWNSAMPLE = 1024  # feature frames per code frame, at most
MAX_HOP_LENGTH = 65536
MAX_LENGTH = 2**40  # samples: about 8 months at 48 kHz
MAX_GAIN_DB = 120
_KEYS = ("id", "sr", "hop", "n", "t", "len", "osr", "q", "k", "g")
PACK_FRAMES = 8192  # code frames (bit-)packed at a time, a multiple of 8: whole bytes each


def bits_per_code(codebook_size: int) -> int:
    """Bits one code takes in the file: ceil(log2(codebook_size)), at least 1."""
    if not MIN_CODEBOOK_SIZE <= codebook_size <= MAX_CODEBOOK_SIZE:
        limits = f"{MIN_CODEBOOK_SIZE}..{MAX_CODEBOOK_SIZE}"
        raise ValueError(f"codebook_size must be in {limits}, got {codebook_size}")
    return (codebook_size - 1).bit_length()


def packed_size(n_code_frames: int, codebook_sizes: tuple[int, ...]) -> int:
    """Bytes that :func:`pack_codes` writes for ``n_code_frames`` frames of these stages."""
    return math.ceil(n_code_frames * sum(bits_per_code(k) for k in codebook_sizes) / 8)


def pack_codes(codes: np.ndarray, codebook_sizes: tuple[int, ...]) -> bytes:
    """Bit-pack codes ``(Q, N')`` (stage q in ``[0, codebook_sizes[q])``) frame-major, MSB first."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[0] != len(codebook_sizes):
        raise ValueError(
            f"expected codes of shape (Q={len(codebook_sizes)}, N'), got {tuple(codes.shape)}"
        )
    if codes.size and (codes.min() < 0 or np.any(codes.max(axis=1) >= codebook_sizes)):
        raise ValueError("codes out of range for their codebook sizes")
    widths = [bits_per_code(k) for k in codebook_sizes]
    blocks = range(0, codes.shape[1], PACK_FRAMES)  # whole bytes each: PACK_FRAMES is even
    return b"".join(_pack_block(codes[:, i : i + PACK_FRAMES], widths) for i in blocks)


def _pack_block(codes: np.ndarray, widths: list[int]) -> bytes:
    bits = np.empty((codes.shape[1], sum(widths)), dtype=np.uint8)  # (N', bits per frame)
    offset = 0
    for row, width in zip(codes, widths, strict=True):
        shifts = np.arange(width - 1, -1, -1, dtype=np.uint32)
        bits[:, offset : offset + width] = (row.astype(np.uint32)[:, None] >> shifts) & 1
        offset += width
    return np.packbits(bits.ravel()).tobytes()


def unpack_codes(data: bytes, codebook_sizes: tuple[int, ...], n_code_frames: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: codes ``(Q, N')`` as uint16.

    Raises :class:`VqkitError` when ``data`` has the wrong size, a code is out of range or the
    padding bits are not zero.
    """
    expected = packed_size(n_code_frames, codebook_sizes)
    if len(data) != expected:
        raise VqkitError(f"code payload is {len(data)} bytes, the header implies {expected}")
    widths = [bits_per_code(k) for k in codebook_sizes]
    codes = np.empty((len(widths), n_code_frames), dtype=np.uint16)
    step = PACK_FRAMES * sum(widths) // 8  # bytes per block of PACK_FRAMES frames
    for i in range(0, n_code_frames, PACK_FRAMES):
        block = codes[:, i : i + PACK_FRAMES]
        block[:] = _unpack_block(data[i // PACK_FRAMES * step :][:step], widths, block.shape[1])
    if codes.size and np.any(codes.max(axis=1) >= codebook_sizes):
        raise VqkitError("corrupt code payload: a code is outside its codebook")
    return codes


def _unpack_block(data: bytes, widths: list[int], n_code_frames: int) -> np.ndarray:
    """Codes ``(Q, n_code_frames)`` of one block of :func:`pack_codes`, checking its padding."""
    n_bits = n_code_frames * sum(widths)
    flat = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    if flat[n_bits:].any():
        raise VqkitError("corrupt code payload: padding bits are not zero")
    bits = flat[:n_bits].reshape(n_code_frames, sum(widths))
    codes = np.empty((len(widths), n_code_frames), dtype=np.uint16)
    offset = 0
    for q, width in enumerate(widths):
        weights = np.left_shift(1, np.arange(width - 1, -1, -1), dtype=np.int64)
        codes[q] = bits[:, offset : offset + width] @ weights
        offset += width
    return codes


@dataclass(frozen=True, eq=False)
class EncodedAudio:
    """One encoded recording: the header fields and the codes ``(Q, N')`` (uint16)."""

    model_id: str
    sample_rate: int  # the model's rate, Hz
    hop_length: int  # samples at sample_rate per feature frame
    n_frames: int  # feature frames N
    length: int  # original length in samples at orig_sample_rate
    orig_sample_rate: int
    codebook_sizes: tuple[int, ...]  # one per stored stage
    codes: np.ndarray  # (Q, N') codes
    gain_db: int = 0  # the gain in dB the decoder divides out (side information)

    def __post_init__(self) -> None:
        codes = np.asarray(self.codes)
        if codes.ndim != 2 or codes.shape[0] != len(self.codebook_sizes):
            raise VqkitError(
                f"expected codes of shape (Q={len(self.codebook_sizes)}, N'), "
                f"got {tuple(codes.shape)}"
            )
        object.__setattr__(self, "codebook_sizes", tuple(int(k) for k in self.codebook_sizes))
        _check_fields(self._header())
        if codes.size and (codes.min() < 0 or np.any(codes.max(axis=1) >= self.codebook_sizes)):
            raise VqkitError("codes out of range for their codebook sizes")
        object.__setattr__(self, "codes", codes.astype(np.uint16))

    @property
    def n_stages(self) -> int:
        """Residual stages stored, Q."""
        return len(self.codebook_sizes)

    @property
    def duration(self) -> float:
        """Seconds of the original recording."""
        return self.length / self.orig_sample_rate

    def payload_size(self) -> int:
        """Bytes of bit-packed codes in the file."""
        return packed_size(self.codes.shape[1], self.codebook_sizes)

    def to_bytes(self) -> bytes:
        """The complete ``.vqc`` file."""
        header = json.dumps(self._header(), separators=(",", ":")).encode()
        body = (
            _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header))
            + header
            + pack_codes(self.codes, self.codebook_sizes)
        )
        return body + _CRC.pack(zlib.crc32(body))

    @classmethod
    def from_bytes(cls, data: bytes) -> EncodedAudio:
        """Parse a ``.vqc`` file; any defect raises :class:`VqkitError` saying which."""
        header_bytes, payload = _split(bytes(data))
        fields = _check_fields(_parse_json(header_bytes))
        sizes = fields["k"] if isinstance(fields["k"], list) else [fields["k"]] * fields["q"]
        return cls(
            model_id=fields["id"],
            sample_rate=fields["sr"],
            hop_length=fields["hop"],
            n_frames=fields["n"],
            length=fields["len"],
            orig_sample_rate=fields["osr"],
            codebook_sizes=tuple(sizes),
            codes=unpack_codes(payload, tuple(sizes), fields["t"]),
            gain_db=fields.get("g", 0),
        )

    def _header(self) -> dict[str, Any]:
        sizes = self.codebook_sizes
        header = {
            "id": self.model_id,
            "sr": self.sample_rate,
            "hop": self.hop_length,
            "n": self.n_frames,
            "t": int(np.shape(self.codes)[1]),
            "len": self.length,
            "osr": self.orig_sample_rate,
            "q": len(sizes),
            "k": sizes[0] if sizes and len(set(sizes)) == 1 else list(sizes),
        }
        if self.gain_db:
            header["g"] = self.gain_db
        return header


def read_code_file(path: str | os.PathLike) -> tuple[EncodedAudio, int]:
    """Read and check the ``.vqc`` file ``path``; returns it and its size in bytes. Errors name
    the file."""
    path = check_readable(path, "a .vqc code file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise VqkitError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        return EncodedAudio.from_bytes(data), len(data)
    except VqkitError as e:
        raise VqkitError(f"{path}: {e}") from None


def _split(data: bytes) -> tuple[bytes, bytes]:
    """Check magic, version, size and CRC; return (header JSON bytes, packed codes)."""
    if data[: len(MAGIC)] != MAGIC[: len(data)]:
        raise VqkitError("not a vqkit code file (wrong magic bytes)")
    if len(data) < _PREFIX.size:
        raise VqkitError(f"truncated code file ({len(data)} bytes)")
    _, version, header_size = _PREFIX.unpack_from(data)
    if version > FORMAT_VERSION:
        raise VqkitError(
            f"code file format version {version} is newer than this vqkit reads "
            f"({FORMAT_VERSION}): upgrade vqkit"
        )
    if version < 1:
        raise VqkitError(f"code file has invalid format version {version}")
    end = _PREFIX.size + header_size
    if len(data) < end + _CRC.size:
        raise VqkitError(f"truncated code file ({len(data)} bytes, header alone needs {end})")
    expected = _expected_size(data[_PREFIX.size : end])
    if expected is not None and len(data) < expected:
        raise VqkitError(f"truncated code file ({len(data)} bytes of {expected})")
    (crc,) = _CRC.unpack_from(data, len(data) - _CRC.size)
    if zlib.crc32(data[: -_CRC.size]) != crc:
        raise VqkitError("corrupt code file: CRC mismatch")
    return data[_PREFIX.size : end], data[end : -_CRC.size]


def _expected_size(header_bytes: bytes) -> int | None:
    """The file size a header implies, or None when the header is unreadable (the CRC decides)."""
    try:
        fields = _check_fields(_parse_json(header_bytes))
    except VqkitError:
        return None
    sizes = fields["k"] if isinstance(fields["k"], list) else [fields["k"]] * fields["q"]
    return _PREFIX.size + len(header_bytes) + packed_size(fields["t"], tuple(sizes)) + _CRC.size


def _parse_json(header_bytes: bytes) -> dict[str, Any]:
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError too
        raise VqkitError(f"code file header is not valid JSON ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise VqkitError("code file header is not a JSON object")
    return header


def _int(header: dict[str, Any], key: str, low: int, high: int) -> int:
    if key not in header:
        raise VqkitError(f"code file header lacks field '{key}'")
    value = header[key]
    if type(value) is not int or not low <= value <= high:
        raise VqkitError(f"code file header field '{key}' must be an integer in {low}..{high}")
    return value


def _check_fields(header: dict[str, Any]) -> dict[str, Any]:
    """Validate a header dict (types, ranges, consistency); return it."""
    unknown = sorted(set(header) - set(_KEYS))
    if unknown:
        raise VqkitError(f"code file header has unknown field '{shown(unknown[0])}'")
    model_id = header.get("id")
    if not isinstance(model_id, str) or not 1 <= len(model_id) <= 64:
        raise VqkitError("code file header field 'id' must be a model id string")
    sample_rate = _int(header, "sr", MIN_SAMPLE_RATE, MAX_SAMPLE_RATE)
    hop_length = _int(header, "hop", 1, MAX_HOP_LENGTH)
    length = _int(header, "len", 1, MAX_LENGTH)
    orig_sample_rate = _int(header, "osr", MIN_SAMPLE_RATE, MAX_SAMPLE_RATE)
    n_stages = _int(header, "q", 1, MAX_STAGES)
    n_code_frames = _int(header, "t", 1, MAX_LENGTH)
    n_frames = _int(header, "n", 1, n_code_frames * MAX_DOWNSAMPLE)
    if "g" in header:
        _int(header, "g", -MAX_GAIN_DB, MAX_GAIN_DB)
    if "k" not in header:
        raise VqkitError("code file header lacks field 'k'")
    sizes = header["k"]
    sizes = sizes if isinstance(sizes, list) else [sizes]
    if len(sizes) not in (1, n_stages) or (len(sizes) == 1 and isinstance(header["k"], list)):
        raise VqkitError("code file header field 'k' must be one int or a list of 'q' ints")
    for size in sizes:
        if type(size) is not int or not MIN_CODEBOOK_SIZE <= size <= MAX_CODEBOOK_SIZE:
            raise VqkitError(
                f"code file header field 'k' must hold codebook sizes in "
                f"{MIN_CODEBOOK_SIZE}..{MAX_CODEBOOK_SIZE}"
            )
    # Centred frames: n = 1 + T // hop for T samples at the model rate; allow rounding slack.
    model_length = length * sample_rate / orig_sample_rate
    if abs(n_frames - 1 - model_length / hop_length) > 2:
        raise VqkitError(
            f"code file header is inconsistent: {n_frames} frames of hop {hop_length} at "
            f"{sample_rate} Hz do not cover {length} samples at {orig_sample_rate} Hz"
        )
    return header
