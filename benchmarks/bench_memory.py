"""Peak memory of ``vqkit encode`` and ``vqkit decode`` against the length of the recording.

Each run is a fresh ``python -m vqkit`` process on one thread (``OMP_NUM_THREADS=1``, niced); its
peak resident set size is the kernel's ``ru_maxrss`` for that child alone. The input is real
speech, resampled to 16 kHz and repeated to fill each duration (written block by block): every
FSDD recording (six male voices: low pitch means many harmonics, the synthesiser's largest work
arrays) when ``--speech`` names its folder, else the bundled sample clips; or with ``--tone`` a
tone in noise, whose pitch track reaches YIN's 50 Hz floor (the worst case). The shipped model
unless ``--model`` (FSDD: ``--speech ../shared/data/fsdd/recordings``)::

    .venv/bin/python benchmarks/bench_memory.py [--minutes 10 60] [--speech FOLDER] [--model M]

The guarantee it measures: memory is bounded by the codec's chunk, not the recording's length.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile as sf

from vqkit.audio.io import read_audio

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = sorted((ROOT / "vqkit" / "assets" / "sample").glob("*.flac"))
RATE = 16000


def noisy_tone(n: int) -> Iterator[np.ndarray]:
    """``n`` samples of a tone gliding around 150 Hz in noise, in 10 s blocks: YIN finds pitches
    down to its 50 Hz floor, the most harmonics the synthesiser makes (its worst case)."""
    t, rng = np.arange(10 * RATE) / RATE, np.random.default_rng(0)
    for start in range(0, n, t.size):
        noise = 0.05 * rng.standard_normal(t.size)
        block = 0.3 * np.sin(2 * np.pi * (150 + 50 * np.sin(t + start)) * t) + noise
        yield block[: n - start].astype(np.float32)


def repeated(clips: list[Path], n: int) -> Iterator[np.ndarray]:
    """``n`` samples of ``clips`` one after another, repeated."""
    speech = np.concatenate([read_audio(clip, RATE)[0] for clip in clips])
    for start in range(0, n, len(speech)):
        yield speech[: n - start]


def write_long_input(path: Path, minutes: float, clips: list[Path]) -> float:
    """``minutes`` of 16 kHz PCM: ``clips`` repeated, or the noisy tone when there are none;
    returns seconds."""
    n = round(minutes * 60 * RATE)
    with sf.SoundFile(path, "w", RATE, 1, "PCM_16") as f:
        for block in repeated(clips, n) if clips else noisy_tone(n):
            f.write(block)
    return n / RATE


def peak_of(argv: list[str]) -> tuple[int, float]:
    """Run ``python -m vqkit ARGV`` (one thread, nice 5); its peak RSS in bytes and seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(
        ["nice", "-n", "5", sys.executable, "-m", "vqkit", *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"vqkit {' '.join(argv)} failed: {proc.stderr.read().decode()}")
    return usage.ru_maxrss * 1024, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[10.0, 60.0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--speech", type=Path, help="a folder of speech clips (default: sample)")
    parser.add_argument("--tone", action="store_true", help="a noisy tone instead of speech")
    args = parser.parse_args()
    clips = [] if args.tone else sorted(args.speech.glob("*.wav")) if args.speech else SAMPLE
    print(
        f"input: {len(clips)} clips from {args.speech or 'the bundled sample'}"
        if clips
        else "input: a noisy tone"
    )
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for minutes in args.minutes:
            wav, vqc, out = (Path(folder) / name for name in ("in.wav", "x.vqc", "out.wav"))
            seconds = write_long_input(wav, minutes, clips)
            encode = peak_of(["encode", str(wav), str(vqc), "--model", args.model])
            decode = peak_of(["decode", str(vqc), str(out), "--model", args.model])
            rows.append(
                {
                    "minutes": minutes,
                    "encode_peak_mb": round(encode[0] / 2**20),
                    "encode_seconds": round(encode[1], 1),
                    "decode_peak_mb": round(decode[0] / 2**20),
                    "decode_seconds": round(decode[1], 1),
                    "audio_seconds": seconds,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    python = platform.python_version()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {python}")
    print("| input | encode peak RSS | encode time | decode peak RSS | decode time |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['minutes']:g} min | {row['encode_peak_mb']} MB | {row['encode_seconds']} s "
            f"| {row['decode_peak_mb']} MB | {row['decode_seconds']} s |"
        )


if __name__ == "__main__":
    main()
