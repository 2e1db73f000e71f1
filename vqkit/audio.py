"""Audio I/O: read anything libsndfile reads, mix to mono, resample with soxr, pad or crop, write.

Waveforms are float32 numpy arrays of shape ``(T,)`` in [-1, 1] unless stated otherwise.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from vqkit.errors import VqkitError
from vqkit.files import atomic_path

# Below 4 kHz a recording holds under 2 kHz of bandwidth, too little for speech: such a rate is
# almost always a damaged header, and upsampling it would multiply the samples to hold.
MIN_SAMPLE_RATE = 4_000
MAX_SAMPLE_RATE = 384_000
_WAV_UNKNOWN_SIZES = (0, 0xFFFFFFFF)  # data sizes that streaming writers leave in the header


def read_audio(path: str | os.PathLike, sample_rate: int | None = None) -> tuple[np.ndarray, int]:
    """Read an audio file as mono float32 ``(T,)``, resampled to ``sample_rate`` when given.

    Returns ``(wave, rate)``. Raises :class:`VqkitError` for missing, empty, undecodable or
    non-finite files; silence is valid audio.
    """
    path = Path(path)
    if not path.is_file():
        raise VqkitError(f"{path}: no such file")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError, OSError) as e:
        raise VqkitError(f"{path}: cannot decode audio ({_short(e)})") from None
    if data.shape[0] == 0:
        raise VqkitError(f"{path}: audio has no samples")
    if not np.isfinite(data).all():
        raise VqkitError(f"{path}: audio contains NaN or Inf samples")
    wave = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if sample_rate is not None:
        wave = resample(wave, rate, sample_rate)
        rate = sample_rate
    return np.ascontiguousarray(wave, dtype=np.float32), int(rate)


def resample(wave: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Resample ``(T,)`` from ``orig_sr`` to ``target_sr`` with soxr (high quality)."""
    for name, sr in (("source", orig_sr), ("target", target_sr)):
        if not MIN_SAMPLE_RATE <= sr <= MAX_SAMPLE_RATE:
            raise VqkitError(
                f"{name} sample rate {sr} Hz is outside {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz"
            )
    if orig_sr == target_sr:
        return wave.astype(np.float32, copy=False)
    return soxr.resample(wave.astype(np.float32, copy=False), orig_sr, target_sr, quality="HQ")


def fix_length(
    wave: np.ndarray, length: int, side: str = "right", mode: str = "constant"
) -> np.ndarray:
    """Pad or crop ``(T,)`` to exactly ``length`` samples.

    ``side`` says where padding goes and which end is cropped ("right" keeps the start);
    ``mode`` is "constant" (zeros) or "reflect" (mirrored, repeated for very short inputs).
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if mode not in ("constant", "reflect"):
        raise ValueError(f"mode must be 'constant' or 'reflect', got {mode!r}")
    n = wave.shape[0]
    if n >= length:
        return wave[:length] if side == "right" else wave[n - length :]
    pad = (0, length - n) if side == "right" else (length - n, 0)
    if mode == "reflect" and n > 1:
        # numpy's reflect needs pad < n; pad repeatedly for inputs much shorter than the target.
        out = wave
        while out.shape[0] < length:
            step = min(length - out.shape[0], out.shape[0] - 1)
            out = np.pad(out, (0, step) if side == "right" else (step, 0), mode="reflect")
        return out.astype(wave.dtype, copy=False)
    return np.pad(wave, pad, mode="constant")


def write_audio(path: str | os.PathLike, wave: np.ndarray, sample_rate: int) -> None:
    """Write mono ``(T,)`` audio as 16-bit WAV or FLAC (by extension), atomically."""
    path = Path(path)
    fmt = {".wav": "WAV", ".flac": "FLAC"}.get(path.suffix.lower())
    if fmt is None:
        raise VqkitError(f"{path}: output must end in .wav or .flac")
    wave = np.clip(np.nan_to_num(np.asarray(wave, dtype=np.float32)), -1.0, 1.0)
    with atomic_path(path) as tmp:
        sf.write(str(tmp), wave, sample_rate, format=fmt, subtype="PCM_16")


def check_complete(path: str | os.PathLike) -> None:
    """Raise :class:`VqkitError` when ``path`` is a WAV file cut short: its data chunk holds fewer
    bytes than its header says (libsndfile would quietly read what is there). Other formats, and
    WAV files written by streaming tools that leave the size unset, pass."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(12)
            if head[:4] != b"RIFF" or head[8:] != b"WAVE":
                return
            position = 12
            while position + 8 <= size:
                f.seek(position)
                chunk, n = struct.unpack("<4sI", f.read(8))
                if chunk == b"data":
                    there = size - position - 8
                    if n not in _WAV_UNKNOWN_SIZES and there < n:
                        raise VqkitError(
                            f"{path}: truncated WAV file: its header promises {n} bytes of "
                            f"audio, only {there} are there"
                        )
                    return
                position += 8 + n + n % 2
    except OSError as e:
        raise VqkitError(f"{path}: cannot read ({e.strerror or e})") from None


def _short(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
