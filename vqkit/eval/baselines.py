"""Systems to compare the codec with: Codec 2 and Opus through their own command-line tools, the
Griffin-Lim oracle, and the model itself, all behind one small interface.

A system maps a clip ``(T,)`` at some rate to an :class:`Output`: the decoded wave at the system's
own rate, the bytes it spent and how long encoding and decoding took. Tools run in a temporary
folder through ``subprocess`` (argument lists, never a shell). A missing tool is reported by
:func:`make_baselines` as skipped with its reason, never raised.
"""

from __future__ import annotations

import difflib
import functools
import math
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import scipy.signal
import soundfile as sf
import torch

from vqkit.audio.io import fix_length, resample
from vqkit.errors import VqkitError
from vqkit.eval.metrics import is_failed, stoi, try_metric

CODEC2_RATE = 8000
CODEC2_MODES = ("3200", "2400", "1600", "1400", "1300", "1200", "700C", "450")
CODEC2_MAX_LAG = 800  # samples at 8 kHz searched for the decoder's delay (100 ms)
ENVELOPE_SECONDS = 0.02
WAVEFORM_CORRELATION = 0.5
OPUS_KBPS = (6.0, 8.0, 12.0)
OPUS_DECODE_RATE = 48000
BASELINES = ("codec2", "opus", "oracle")
TOOL_TIMEOUT_S = 120


@dataclass(frozen=True)
class Output:
    """What one system made of one clip.

    ``wave`` is float32 ``(T',)`` at ``sample_rate``; ``n_bytes`` is the whole encoded file and
    ``payload_bytes`` the codec's own bits (container headers excluded), both None for systems
    without a bitstream; ``codes`` is the model's ``(Q, N')`` code array, else None.
    """

    wave: np.ndarray
    sample_rate: int
    n_bytes: int | None
    payload_bytes: int | None
    encode_seconds: float
    decode_seconds: float
    codes: np.ndarray | None = None


class System(Protocol):
    """One codec under test: ``name`` is unique, ``family`` groups systems for the plots."""

    name: str
    family: str
    narrowband: bool  # True: output at 8 kHz, scored at 8 kHz and upsampled for PESQ-WB
    needs_alignment: bool  # True: output has a fixed delay to find once per system

    def run(self, wave: np.ndarray, sample_rate: int) -> Output: ...


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise VqkitError(f"{name} not found on PATH")
    return path


def _call(argv: list[str]) -> None:
    """Run a tool; a failure raises RuntimeError with the tool's last line of stderr."""
    try:
        done = subprocess.run(argv, capture_output=True, timeout=TOOL_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"{Path(argv[0]).name} failed: {e}") from None
    if done.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines() or ["no message"]
        raise RuntimeError(f"{Path(argv[0]).name} exited {done.returncode}: {lines[-1]}")


def _to_s16(wave: np.ndarray) -> np.ndarray:
    return np.round(np.clip(wave, -1.0, 1.0) * 32767.0).astype("<i2")


class Codec2:
    """Codec 2 at one mode via ``c2enc`` / ``c2dec``: 8 kHz raw s16 in and out, headerless bits.

    The decoder's output is delayed; ``lag`` (samples at 8 kHz) is removed from every output.
    """

    family = "codec2"
    narrowband = True
    needs_alignment = True

    def __init__(self, mode: str, lag: int = 0) -> None:
        self.mode = mode
        self.lag = lag
        self.name = f"codec2-{mode}"

    def run(self, wave: np.ndarray, sample_rate: int) -> Output:
        x = resample(wave, sample_rate, CODEC2_RATE)
        with tempfile.TemporaryDirectory(prefix="vqkit-c2-") as tmp:
            src, bits, dst = Path(tmp, "in.raw"), Path(tmp, "out.bit"), Path(tmp, "out.raw")
            src.write_bytes(_to_s16(x).tobytes())
            start = time.perf_counter()
            _call([_tool("c2enc"), self.mode, str(src), str(bits)])
            middle = time.perf_counter()
            _call([_tool("c2dec"), self.mode, str(bits), str(dst)])
            end = time.perf_counter()
            n_bytes = bits.stat().st_size
            y = np.frombuffer(dst.read_bytes(), dtype="<i2").astype(np.float32) / 32768.0
        y = shift(y, self.lag, x.shape[0])
        return Output(y, CODEC2_RATE, n_bytes, n_bytes, middle - start, end - middle)


class Opus:
    """Opus via ``opusenc --speech --hard-cbr --bitrate K`` / ``opusdec`` (decoded at 48 kHz and
    resampled back to the input rate). ``payload_bytes`` counts the audio packets only."""

    family = "opus"
    narrowband = False
    needs_alignment = False

    def __init__(self, kbps: float) -> None:
        self.kbps = kbps
        self.name = f"opus-{kbps:g}k"

    def run(self, wave: np.ndarray, sample_rate: int) -> Output:
        with tempfile.TemporaryDirectory(prefix="vqkit-opus-") as tmp:
            src, coded, dst = Path(tmp, "in.wav"), Path(tmp, "out.opus"), Path(tmp, "out.wav")
            sf.write(str(src), _to_s16(wave), sample_rate, subtype="PCM_16")
            start = time.perf_counter()
            enc = [_tool("opusenc"), "--quiet", "--speech", "--hard-cbr", "--padding", "0"]
            _call([*enc, "--bitrate", f"{self.kbps:g}", str(src), str(coded)])
            middle = time.perf_counter()
            rate = ["--rate", str(OPUS_DECODE_RATE)]
            _call([_tool("opusdec"), "--quiet", *rate, str(coded), str(dst)])
            end = time.perf_counter()
            data = coded.read_bytes()
            y, y_rate = sf.read(str(dst), dtype="float32", always_2d=True)
        y = fix_length(resample(y[:, 0], y_rate, sample_rate), wave.shape[0])
        payload = sum(ogg_packet_sizes(data)[2:])  # packets 0, 1: OpusHead, OpusTags
        return Output(y, sample_rate, len(data), payload, middle - start, end - middle)


class Oracle:
    """The ceiling of the resynthesis path: the true features through the model's own front end,
    then its synthesis. For a spectrogram model, back to linear magnitude and Griffin-Lim with the
    model's iterations and momentum; for a parametric one, the unquantised envelope, F0 and
    voicing through the harmonic-plus-noise synthesiser."""

    family = "oracle"
    narrowband = False
    needs_alignment = False

    def __init__(self, codec: Any) -> None:
        self.codec = codec
        self.name = "oracle-harmonic" if codec.parametric else "oracle-griffinlim"

    def run(self, wave: np.ndarray, sample_rate: int) -> Output:
        from vqkit.audio.envelope import fill_unvoiced
        from vqkit.audio.stft import griffin_lim
        from vqkit.audio.synthesis import make_synthesiser

        config = self.codec.checkpoint.config
        rate = self.codec.sample_rate
        x = torch.from_numpy(resample(wave, sample_rate, rate))[None]
        start = time.perf_counter()
        if self.codec.parametric:
            with torch.no_grad():
                envelope, f0, voiced = self.codec.frontend.analyse(x)
                middle = time.perf_counter()
                synthesiser = make_synthesiser(config.codec, self.codec.frontend)
                f0 = fill_unvoiced(f0, voiced)
                y = synthesiser(envelope, x.shape[1], f0=f0, voiced=voiced)
            end = time.perf_counter()
            return Output(y[0].numpy(), rate, None, None, middle - start, end - middle)
        with torch.no_grad():
            magnitude = self.codec.frontend.to_magnitude(self.codec.frontend(x))
            middle = time.perf_counter()
            y = griffin_lim(
                magnitude,
                n_fft=config.features.n_fft,
                hop_length=config.features.hop_length,
                win_length=config.features.win_length or None,
                n_iter=config.codec.gl_iters,
                momentum=config.codec.gl_momentum,
                length=x.shape[1],
            )
        end = time.perf_counter()
        y = fix_length(y[0].numpy().astype(np.float32), x.shape[1])
        return Output(y, rate, None, None, middle - start, end - middle)


class Model:
    """The vqkit codec at one bitrate: ``encode`` to a code file's bytes, then ``decode``."""

    family = "vqkit"
    narrowband = False
    needs_alignment = False

    def __init__(self, codec: Any, kbps: float) -> None:
        self.codec = codec
        self.kbps = kbps
        self.name = f"vqkit-{kbps:.2f}k"

    def warm_up(self, sample_rate: int) -> None:
        """Encode and decode a short noise once, so one-off costs (measuring the networks'
        reach, allocator warm-up) are not timed as the first clip's."""
        noise = np.random.default_rng(0).normal(0.0, 0.1, sample_rate // 2).astype(np.float32)
        self.run(noise, sample_rate)

    def run(self, wave: np.ndarray, sample_rate: int) -> Output:
        start = time.perf_counter()
        encoded = self.codec.encode(wave, sample_rate, bitrate=self.kbps)
        data = encoded.to_bytes()
        middle = time.perf_counter()
        y = self.codec.decode(encoded)
        end = time.perf_counter()
        codes = np.asarray(encoded.codes)[len(self.codec.side_layout(encoded)[1]) :]  # VQ stages
        payload = int(encoded.payload_size())  # packed codes, without the file's header
        y = np.asarray(y, dtype=np.float32)
        return Output(y, sample_rate, len(data), payload, middle - start, end - middle, codes)


def ogg_packet_sizes(data: bytes) -> list[int]:
    """Sizes in bytes of the packets of an Ogg stream (one logical stream), from its pages."""
    sizes: list[int] = []
    pos, current = 0, 0
    while pos + 27 <= len(data):
        if data[pos : pos + 4] != b"OggS":
            raise ValueError(f"not an Ogg page at byte {pos}")
        n_segments = data[pos + 26]
        lacing = data[pos + 27 : pos + 27 + n_segments]
        for value in lacing:
            current += value
            if value < 255:  # a lacing value below 255 ends a packet
                sizes.append(current)
                current = 0
        pos += 27 + n_segments + sum(lacing)
    return sizes


def shift(y: np.ndarray, lag: int, length: int) -> np.ndarray:
    """Undo a delay of ``lag`` samples (negative: an advance) and pad or crop to ``length``."""
    y = y[lag:] if lag >= 0 else np.concatenate([np.zeros(-lag, dtype=y.dtype), y])
    return fix_length(y, length)


def estimate_lag(refs: Sequence[np.ndarray], outputs: Sequence[np.ndarray], max_lag: int) -> int:
    """The one delay (in samples, 0..max_lag) of ``outputs`` against ``refs`` that maximises the
    mean over clips of their normalised cross-correlation: one fixed lag for every clip."""
    return int(np.argmax(_correlation(refs, outputs, max_lag)))


def _correlation(
    refs: Sequence[np.ndarray], outputs: Sequence[np.ndarray], max_lag: int
) -> np.ndarray:
    """Mean over clips of the normalised cross-correlation at lags 0..max_lag: (max_lag + 1,)."""
    total = np.zeros(max_lag + 1)
    for x, y in zip(refs, outputs, strict=True):
        size = 1 << math.ceil(math.log2(max(x.shape[0] + y.shape[0], 2)))
        spectrum = np.fft.rfft(y, size) * np.conj(np.fft.rfft(x, size))
        corr = np.fft.irfft(spectrum, size)[: max_lag + 1]  # corr[l] = sum_t x[t] y[t + l]
        norm = np.linalg.norm(x) * np.linalg.norm(y)
        if norm > 0:
            total += corr / norm
    return total / max(len(refs), 1)


def _envelope(x: np.ndarray, sample_rate: int) -> np.ndarray:
    """Amplitude envelope smoothed over 20 ms, mean removed: insensitive to the phase that a
    parametric decoder does not keep."""
    width = max(int(ENVELOPE_SECONDS * sample_rate), 1)
    kernel = np.hanning(width + 2)[1:-1]
    env = np.convolve(np.abs(scipy.signal.hilbert(x)), kernel / kernel.sum(), mode="same")
    return env - env.mean()


def find_delay(
    refs: Sequence[np.ndarray],
    outputs: Sequence[np.ndarray],
    sample_rate: int,
    max_lag: int,
    max_clips: int = 8,
) -> int:
    """One fixed delay of a system's ``outputs`` against ``refs`` (both at ``sample_rate``).

    An output that keeps the waveform (Opus, a plain delay: mean normalised correlation above
    0.5) is aligned to the sample by cross-correlation. A parametric one (Codec 2: under 0.3)
    by the peak of the envelope cross-correlation, refined by the mean STOI on a grid around it.
    At most ``max_clips`` clips are used, to bound the cost.
    """
    refs, outputs = list(refs)[:max_clips], list(outputs)[:max_clips]
    waveform = _correlation(refs, outputs, max_lag)
    if waveform.max() > WAVEFORM_CORRELATION:
        return int(np.argmax(waveform))
    coarse = estimate_lag(
        [_envelope(x, sample_rate) for x in refs],
        [_envelope(y, sample_rate) for y in outputs],
        max_lag,
    )
    best, best_score = coarse, -math.inf
    for lag in [coarse + d for d in range(-32, 33, 8) if 0 <= coarse + d <= max_lag]:
        scores = [
            try_metric(stoi, x, shift(y, lag, x.shape[0]), sample_rate)
            for x, y in zip(refs, outputs, strict=True)
        ]
        numbers = [s for s in scores if not is_failed(s)]
        score = float(np.mean(numbers)) if numbers else -math.inf
        if score > best_score:
            best, best_score = lag, score
    return best


@functools.lru_cache(maxsize=1)
def codec2_modes() -> tuple[str, ...]:
    """The modes of :data:`CODEC2_MODES` that the installed ``c2enc`` / ``c2dec`` accept."""
    if shutil.which("c2enc") is None or shutil.which("c2dec") is None:
        return ()
    probe = np.random.default_rng(0).normal(0, 0.1, CODEC2_RATE // 5).astype(np.float32)
    working = []
    for mode in CODEC2_MODES:
        try:
            out = Codec2(mode).run(probe, CODEC2_RATE)
        except RuntimeError:
            continue
        if out.n_bytes and out.wave.size:
            working.append(mode)
    return tuple(working)


def make_baselines(
    names: Sequence[str], codec: Any | None
) -> tuple[list[System], list[dict[str, str]]]:
    """The baseline systems for ``names`` (codec2, opus, oracle) and the skipped ones with reasons.

    ``codec`` (a loaded vqkit codec) is needed by the oracle only.
    """
    systems: list[System] = []
    skipped: list[dict[str, str]] = []
    for name in names:
        if name not in BASELINES:
            near = difflib.get_close_matches(name, BASELINES, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else f"; valid: {', '.join(BASELINES)}"
            raise VqkitError(f"unknown baseline '{name}'{hint}")
        missing = {"codec2": ["c2enc", "c2dec"], "opus": ["opusenc", "opusdec"], "oracle": []}
        absent = [tool for tool in missing[name] if shutil.which(tool) is None]
        if absent:
            skipped.append({"system": name, "reason": f"{', '.join(absent)} not found on PATH"})
        elif name == "codec2":
            modes = codec2_modes()
            systems += [Codec2(mode) for mode in modes]
            if not modes:
                skipped.append({"system": name, "reason": "no Codec 2 mode works"})
        elif name == "opus":
            systems += [Opus(kbps) for kbps in OPUS_KBPS]
        elif codec is None:
            skipped.append({"system": name, "reason": "no model to take the front end from"})
        else:
            systems.append(Oracle(codec))
    return systems, skipped
