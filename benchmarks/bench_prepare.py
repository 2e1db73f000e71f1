"""How long ``vqkit prepare`` takes on FSDD (3,000 recordings) and where the time goes.

Prepares the corpus into a fresh temporary cache with N worker processes, reruns it (every file
already done: the cost of resuming), and prints the wall time and the worker time per stage
(read = decode + resample, features = STFT front end, write = float16 shard + fsync + rename),
summed over workers, plus the cost of one fsync'd atomic write against a plain one::

    .venv/bin/python benchmarks/bench_prepare.py                      # FSDD, 2 workers
    .venv/bin/python benchmarks/bench_prepare.py --workers 1 --set features.kind='mel'
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from vqkit.config import load_config
from vqkit.data.cache import FeatureCache
from vqkit.data.prepare import SHARD_ITEMS, prepare
from vqkit.data.writer import PrepareSummary
from vqkit.files import atomic_path

FSDD = Path(__file__).resolve().parents[2] / "shared" / "data" / "fsdd" / "recordings"


def write_cost_ms(folder: Path, shape: tuple[int, int], n: int = 200) -> tuple[float, float]:
    """Milliseconds per file: an atomic, fsync'd ``np.save`` and a plain one."""
    x = np.zeros(shape, dtype=np.float16)
    start = time.perf_counter()
    for i in range(n):
        with atomic_path(folder / f"a{i}.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, x, allow_pickle=False)
    middle = time.perf_counter()
    for i in range(n):
        with open(folder / f"p{i}.npy", "wb") as f:
            np.save(f, x, allow_pickle=False)
    end = time.perf_counter()
    return 1000 * (middle - start) / n, 1000 * (end - middle) / n


def report(summary: PrepareSummary, workers: int) -> None:
    s = summary.seconds
    print(f"  {summary.describe().splitlines()[0]}")
    process = s.get("process", 0.0)
    rest = s["wall"] - s["list"] - process - s["stats"]
    print(f"  wall {s['wall']:.2f} s = list {s['list']:.2f} + process {process:.2f}")
    print(f"    + stats {s['stats']:.2f} + config, resume and manifest {rest:.2f}")
    busy = sum(s.get(k, 0.0) for k in ("read", "features", "write"))
    if busy:
        for stage in ("read", "features", "write"):
            share = s.get(stage, 0.0) / busy
            print(f"    worker {stage:8s} {s.get(stage, 0.0):7.2f} s summed ({share:5.1%})")
        idle = workers * s.get("process", 0.0) - busy
        print(f"    worker start-up, transfer and idle {idle:7.2f} s summed")
        print(f"  rate {(summary.n_ok - summary.n_skipped) / process:.0f} files/s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=FSDD, help="corpus (default: FSDD)")
    parser.add_argument("--layout", default="fsdd", help="data.layout (default fsdd)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config")
    args = parser.parse_args(argv)
    config = load_config(None, [f"data.layout={args.layout!r}", *args.overrides])
    print(
        f"vqkit prepare benchmark: {args.src} ({args.layout}), {args.workers} workers, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, {platform.processor() or 'cpu'}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(f"  features {config.features.kind}, n_fft {config.features.n_fft}, "
          f"hop {config.features.hop_length}, {config.audio.sample_rate} Hz")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        out = Path(tmp) / "cache"
        print("first run:")
        first = prepare(args.src, out, config, workers=args.workers, progress=False)
        report(first, args.workers)
        print("rerun (all done, resumed):")
        report(prepare(args.src, out, config, workers=args.workers, progress=False), args.workers)
        cache = FeatureCache(out)
        rows = [row for split in ("train", "val", "test") for row in cache.items(split)]
        shape = (cache.stats["mean"].shape[0], round(np.mean([row["frames"] for row in rows])))
        atomic_ms, plain_ms = write_cost_ms(Path(tmp), shape)
        print(
            f"one utterance's features as its own file: atomic + fsync {atomic_ms:.2f} ms, "
            f"plain {plain_ms:.2f} ms (why shards: one fsync per {SHARD_ITEMS} utterances)"
        )
    return 0 if first.n_ok > 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
