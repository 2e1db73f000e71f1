"""Training throughput of a recipe: frames per second and where a step's time goes.

Runs the trainer's own functions (``training_batch``, ``train_step``) for ``--steps`` steps after a
few warm-up steps (k-means initialisation happens there) on ``--threads`` threads, and prints the
median time of loading a batch and of the optimisation step, and frames (batch x segment) per
second. Then a short full ``train()`` run gives the loop's own figure, evaluation excluded::

    .venv/bin/python benchmarks/bench_train.py --data FSDD_CACHE            # configs/fsdd_vqvae
    .venv/bin/python benchmarks/bench_train.py --data CACHE --config configs/speech_rvq.toml

Make the cache with ``vqkit prepare ../shared/data/fsdd/recordings CACHE --config RECIPE``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from vqkit.config import load_config, replace
from vqkit.data.cache import FeatureCache
from vqkit.data.dataset import SegmentDataset
from vqkit.nn.model import build_model
from vqkit.train.distributed import init_distributed
from vqkit.train.log import read_metrics
from vqkit.train.loop import (
    input_shape,
    make_optimizer,
    make_scheduler,
    resolve_config,
    train,
    train_step,
    training_batch,
)

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "fsdd_vqvae.toml"
WARMUP_STEPS = 5


def time_steps(cache: FeatureCache, config, steps: int) -> tuple[list[float], list[float], int]:
    """Seconds per batch load and per optimisation step, and the model's parameter count."""
    dist = init_distributed("cpu")
    first = SegmentDataset(cache, "train", config.train.segment_frames, train=False)[0]
    torch.manual_seed(config.train.seed)
    model = build_model(config, input_shape(config, first))
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config)
    load_s, step_s = [], []
    for step in range(WARMUP_STEPS + steps):
        start = time.perf_counter()
        x = training_batch(cache, step, config, dist)
        middle = time.perf_counter()
        train_step(model, x, optimizer, scheduler, config)
        end = time.perf_counter()
        if step >= WARMUP_STEPS:
            load_s.append(middle - start)
            step_s.append(end - middle)
    return load_s, step_s, sum(p.numel() for p in model.parameters())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="feature cache")
    parser.add_argument("--config", type=Path, default=RECIPE, help="TOML recipe")
    parser.add_argument("--steps", type=int, default=100, help="timed steps")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    cache = FeatureCache(args.data)
    config = resolve_config(load_config(args.config, args.overrides), cache)
    config = replace(config, train={"device": "cpu", "threads": args.threads})
    tc = config.train
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, ", end="")
    print(f"{args.threads} threads; recipe {args.config.name}, cache {args.data}")
    load_s, step_s, n_params = time_steps(cache, config, args.steps)
    frames = tc.batch_size * tc.segment_frames
    load_ms, step_ms = 1000 * statistics.median(load_s), 1000 * statistics.median(step_s)
    print(f"  model {n_params / 1e6:.2f} M parameters; batch {tc.batch_size} x {tc.segment_frames}")
    print(f"  median per step: load {load_ms:.1f} ms + train {step_ms:.1f} ms")
    print(f"  throughput: {frames / ((load_ms + step_ms) / 1000):,.0f} frames/s ", end="")
    print(f"({frames / (step_ms / 1000):,.0f} frames/s in train_step alone)")

    steps = WARMUP_STEPS + args.steps
    overrides = {"steps": steps, "log_every": 1, "eval_every": steps, "checkpoint_every": steps}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        train(replace(config, train=overrides), data=args.data, run=Path(tmp) / "run")
        wall = time.perf_counter() - start
        rows = read_metrics(Path(tmp) / "run" / "metrics.jsonl")
    rate = [r["frames_per_s"] for r in rows if r["split"] == "train"][-1]
    print(f"  train(): {steps} steps in {wall:.1f} s (with evaluation and checkpoints); ", end="")
    print(f"loop throughput {rate:,.0f} frames/s")


if __name__ == "__main__":
    main()
