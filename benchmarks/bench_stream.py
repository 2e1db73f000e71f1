"""Real-time streaming: 60 s of speech through the stream encoder and decoder at real-time pace.

Two measurements on one thread:

- in process (the Python API): 20 ms blocks are pushed at wall-clock pace into
  ``codec.stream_encoder``, every packet straight into ``codec.stream_decoder``; reports the
  processing time per packet (encoder and decoder work it causes, CPU time and wall time;
  median, 99th percentile, max) against the packet's duration, and the end-to-end delay of
  each output block (from the wall time its first input sample was pushed to the time it came
  out: algorithmic delay plus processing);
- through pipes (the command line): a feeder writes raw PCM at real-time pace into
  ``vqkit encode - - | vqkit decode - -`` and timestamps the PCM coming out; reports the delay of
  the output stream behind the input once it flows (the processes' start-up excluded).

The speech is the bundled sample (four held-out prompts, ``vqkit/assets/sample``) repeated to
``--seconds``::

    .venv/bin/python benchmarks/bench_stream.py [--model M] [--bitrate 1.2] [--seconds 60]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from vqkit.audio.io import read_audio
from vqkit.codec.codec import load_codec

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = sorted((ROOT / "vqkit" / "assets" / "sample").glob("*.flac"))
RATE = 16000
BLOCK = RATE // 50  # 20 ms, as arecord's default period delivers


def speech(seconds: float) -> np.ndarray:
    clips = np.concatenate([read_audio(path, RATE)[0] for path in SAMPLE])
    return np.resize(clips, int(seconds * RATE)).astype(np.float32)


def in_process(codec, wave: np.ndarray, bitrate: float) -> dict[str, float]:
    encoder = codec.stream_encoder(bitrate)
    decoder = codec.stream_decoder(encoder.header.to_bytes())
    work, cpu, delays, arrived, emitted = [], [], [], [], 0
    start = time.perf_counter()
    for i in range(0, len(wave), BLOCK):
        due = start + i / RATE
        time.sleep(max(0.0, due - time.perf_counter()))
        arrived.append(time.perf_counter())  # block i // BLOCK is here
        t0, c0 = time.perf_counter(), time.process_time()
        packets = encoder.push(wave[i : i + BLOCK])
        for packet in packets:
            out = decoder.push(packet)
            now = time.perf_counter()
            if len(out):  # its first sample, emitted, was pushed with block emitted // BLOCK
                delays.append(now - arrived[emitted // BLOCK] - (emitted % BLOCK) / RATE)
                emitted += len(out)
        if packets:
            work.append((time.perf_counter() - t0) / len(packets))
            cpu.append((time.process_time() - c0) / len(packets))
    packet_s = encoder.header.frame_samples / RATE
    work_ms, cpu_ms = 1000 * np.array(work), 1000 * np.array(cpu)
    return {
        "packet_ms": 1000 * packet_s,
        "cpu_median_ms": float(np.median(cpu_ms)),
        "cpu_p99_ms": float(np.percentile(cpu_ms, 99)),
        "work_median_ms": float(np.median(work_ms)),
        "work_p99_ms": float(np.percentile(work_ms, 99)),
        "work_max_ms": float(work_ms.max()),
        "delay_median_ms": 1000 * float(np.median(delays)),
        "delay_max_ms": 1000 * float(np.max(delays)),
        "latency_ms": codec.latency_ms,
    }


def through_pipes(model: str, wave: np.ndarray, bitrate: float) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    vqkit = [sys.executable, "-m", "vqkit"]
    encode = subprocess.Popen(
        [*vqkit, "encode", "-", "-", "--model", model, "--bitrate", str(bitrate)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    decode = subprocess.Popen(
        [*vqkit, "decode", "-", "-", "--model", model],
        stdin=encode.stdout,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    encode.stdout.close()
    pcm = (np.clip(wave, -1, 1) * 32767).astype("<i2").tobytes()
    written: list[tuple[float, int]] = []  # (time, bytes written so far)
    time.sleep(8.0)  # both processes load torch and the model before the clock starts

    def feed() -> None:
        start, step = time.perf_counter(), 2 * BLOCK
        for i in range(0, len(pcm), step):
            time.sleep(max(0.0, start + i / 2 / RATE - time.perf_counter()))
            encode.stdin.write(pcm[i : i + step])
            encode.stdin.flush()
            written.append((time.perf_counter(), i + step))
        encode.stdin.close()

    feeder = threading.Thread(target=feed)
    feeder.start()
    delays, received = [], 0
    while chunk := decode.stdout.read1(4096):
        now = time.perf_counter()
        first = received  # the first byte of this chunk was written at ...
        when = next((t for t, total in written if total > first), None)
        if when is not None:
            delays.append(now - when)
        received += len(chunk)
    feeder.join()
    decode.wait()
    delays_ms = 1000 * np.array(delays[len(delays) // 10 :])  # once it flows
    return {
        "delay_median_ms": float(np.median(delays_ms)),
        "delay_p99_ms": float(np.percentile(delays_ms, 99)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--bitrate", type=float, default=1.2)
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    wave = speech(args.seconds)
    codec = load_codec(args.model)
    load = os.getloadavg()[0]
    print(f"{args.seconds:g} s of the bundled sample at {args.bitrate:g} kbit/s, one thread")
    print(
        f"load average {load:.1f} on {os.cpu_count()} cores (other processes slow the wall clock)"
    )
    print("in process:", {k: round(v, 1) for k, v in in_process(codec, wave, args.bitrate).items()})
    print(
        "pipes:", {k: round(v, 1) for k, v in through_pipes(args.model, wave, args.bitrate).items()}
    )


if __name__ == "__main__":
    main()
