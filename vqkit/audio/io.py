"""Audio I/O: read anything libsndfile reads, mix to mono, resample with soxr, pad or crop, write;
whole files, or block by block (streaming read, streaming resampling, streaming write) so that
memory stays bounded however long the recording.

Waveforms are float32 numpy arrays of shape ``(T,)`` in [-1, 1] unless stated otherwise.
"""

from __future__ import annotations

import contextlib
import numbers
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from vqkit.errors import VqkitError, shown
from vqkit.files import atomic_path, check_readable

# Below 4 kHz a recording holds under 2 kHz of bandwidth, too little for speech: such a rate is
# almost always a damaged header, and upsampling it would multiply the samples to hold.
MIN_SAMPLE_RATE = 4_000
MAX_SAMPLE_RATE = 384_000
BLOCK_FRAMES = 65536  # audio samples read (and resampled) at a time
FLOAT32_MAX = float(np.finfo(np.float32).max)
_WAV_UNKNOWN_SIZES = (0, 0xFFFFFFFF)  # data sizes that streaming writers leave in the header


def read_audio(path: str | os.PathLike, sample_rate: int | None = None) -> tuple[np.ndarray, int]:
    """Read an audio file as mono float32 ``(T,)``, resampled to ``sample_rate`` when given.

    Returns ``(wave, rate)``. Raises :class:`VqkitError` for missing, empty, undecodable,
    truncated or non-finite files; silence is valid audio.
    """
    path = check_readable(path, "an audio file")
    check_complete(path)  # libsndfile would quietly read a cut-short WAV
    try:
        data, rate = sf.read(str(path), dtype="float64", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError, OSError) as e:
        raise VqkitError(f"{path}: cannot decode audio ({_short(e)})") from None
    if data.shape[0] == 0:
        raise VqkitError(f"{path}: audio has no samples")
    data = as_samples(data, str(path))
    wave = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if sample_rate is not None:
        wave = resample(wave, rate, sample_rate)
        rate = sample_rate
    return np.ascontiguousarray(wave, dtype=np.float32), int(rate)


def as_samples(wave: np.ndarray, where: str = "waveform") -> np.ndarray:
    """``wave`` (any shape) as float32 samples: integer PCM divided by its full scale (int16 by
    32768; unsigned types around their midpoint, as 8-bit WAV stores them), floats as they are.

    Raises :class:`VqkitError` naming ``where`` for complex, boolean or non-numeric samples, NaN
    or Inf, and magnitudes beyond float32's range (floats above 1.0 are valid audio).
    """
    wave = np.asarray(wave)
    kind = wave.dtype.kind
    if kind in "iu":
        half = 2.0 ** (8 * wave.dtype.itemsize - 1)
        return ((wave.astype(np.float64) - (half if kind == "u" else 0.0)) / half).astype(
            np.float32
        )
    if kind == "c":
        raise VqkitError(f"{where}: complex samples; pass real audio (its real part, say)")
    if kind != "f":
        raise VqkitError(f"{where}: samples of type {wave.dtype} are not audio")
    if not np.isfinite(wave).all():
        raise VqkitError(f"{where}: audio contains NaN or Inf samples")
    peak = float(np.abs(wave).max(initial=0.0))
    if peak > FLOAT32_MAX:
        raise VqkitError(
            f"{where}: samples reach {peak:.3g}, beyond float32's range ({FLOAT32_MAX:.3g})"
        )
    return wave.astype(np.float32, copy=False)


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
    fmt = _audio_format(path)
    wave = pcm_range(wave)
    with atomic_path(path) as tmp:
        sf.write(str(tmp), wave, sample_rate, format=fmt, subtype="PCM_16")


def write_audio_blocks(
    path: str | os.PathLike, blocks: Iterable[np.ndarray], sample_rate: int
) -> None:
    """Write a stream of mono blocks ``(T_i,)`` as one 16-bit WAV or FLAC file (by extension),
    atomically: the file appears whole when the stream ends, or not at all."""
    path = Path(path)
    fmt = _audio_format(path)
    with (
        atomic_path(path) as tmp,
        sf.SoundFile(str(tmp), "w", sample_rate, 1, "PCM_16", format=fmt) as sink,
    ):
        for block in blocks:
            sink.write(pcm_range(block))


def pcm_range(wave: np.ndarray) -> np.ndarray:
    """Samples ``(T,)`` fit for a 16-bit file: NaN and infinite ones (a model gone wrong) become
    silence, never full scale, and the rest is clipped to [-1, 1]."""
    wave = np.asarray(wave, dtype=np.float32)
    return np.clip(np.where(np.isfinite(wave), wave, np.float32(0)), -1.0, 1.0)


def _audio_format(path: Path) -> str:
    fmt = {".wav": "WAV", ".flac": "FLAC"}.get(path.suffix.lower())
    if fmt is None:
        raise VqkitError(f"{path}: output must end in .wav or .flac")
    return fmt


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


def check_rate(sample_rate: object) -> int:
    """``sample_rate`` as an int in 4..384 kHz: any integer type (``np.int64(16000)``) or a
    float holding a whole number (``16000.0``); anything else is a :class:`VqkitError`."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Real):
        raise VqkitError(f"sample rate must be a number of Hz, got {shown(repr(sample_rate))}")
    if not isinstance(sample_rate, numbers.Integral) and not float(sample_rate).is_integer():
        raise VqkitError(f"sample rate must be a whole number of Hz, got {sample_rate}")
    rate = int(sample_rate)
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise VqkitError(
            f"sample rate {rate} Hz is outside {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz"
        )
    return rate


def resample_stream(
    blocks: Iterable[np.ndarray], orig_sr: int, target_sr: int
) -> Iterator[np.ndarray]:
    """Resample a stream of blocks with one soxr stream: the same samples as resampling at once."""
    if orig_sr == target_sr:
        yield from (np.asarray(block, dtype=np.float32) for block in blocks)
        return
    stream = soxr.ResampleStream(orig_sr, target_sr, 1, dtype="float32", quality="HQ")
    for block in blocks:
        yield stream.resample_chunk(np.asarray(block, dtype=np.float32))
    yield stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)


def exact_length(blocks: Iterable[np.ndarray], length: int) -> Iterator[np.ndarray]:
    """Crop or zero-pad a stream of blocks to exactly ``length`` samples."""
    emitted = 0
    for block in blocks:
        block = block[: length - emitted]
        emitted += len(block)
        yield block
    yield np.zeros(length - emitted, dtype=np.float32)


def open_audio_blocks(path: str | os.PathLike) -> tuple[int, Iterator[np.ndarray]]:
    """The sample rate of an audio file and its mono float32 blocks, read a block at a time
    (the checks of :func:`read_audio`, applied block by block)."""
    path = check_readable(path, "an audio file")
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, ValueError, OSError) as e:
        raise VqkitError(f"{path}: cannot decode audio ({_short(e)})") from None
    if not MIN_SAMPLE_RATE <= info.samplerate <= MAX_SAMPLE_RATE:
        raise VqkitError(
            f"{path}: sample rate {info.samplerate} Hz is not supported "
            f"(vqkit reads {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz)"
        )
    check_complete(path)  # a cut-short WAV would otherwise encode without its end
    return info.samplerate, _blocks(path, info.channels)


def native_rates(paths: Iterable[str | os.PathLike]) -> list[int]:
    """The sample rates of the files among ``paths`` that :func:`open_audio_blocks` accepts."""
    rates = []
    for path in paths:
        with contextlib.suppress(VqkitError):
            rates.append(open_audio_blocks(path)[0])
    return rates


def _blocks(path: Path, channels: int) -> Iterator[np.ndarray]:
    n_read = 0
    with sf.SoundFile(str(path)) as f:
        while True:
            try:
                data = f.read(BLOCK_FRAMES, dtype="float64", always_2d=True)
            except (sf.LibsndfileError, RuntimeError, ValueError) as e:
                raise VqkitError(f"{path}: cannot decode audio ({_short(e)})") from None
            if len(data) == 0:
                break
            data = as_samples(data, str(path))  # float64 first: 1e300 is finite, not Inf
            n_read += len(data)
            yield data.mean(axis=1) if channels > 1 else data[:, 0]
    if n_read == 0:
        raise VqkitError(f"{path}: audio has no samples")
