"""A run's bookkeeping: its metrics file (``metrics.jsonl``), loss plot (``loss.png``), progress
bar, throughput meter and Ctrl-C handling."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vqkit.errors import Interrupted, VqkitError
from vqkit.files import atomic_write_bytes, new_figure, save_figure


class MetricsLog:
    """One JSON object per line, each with ``step`` and ``split``; rewritten atomically on append.

    Runs log a few hundred rows, so rewriting the whole file keeps it whole after any crash, and a
    resumed run can drop the rows an interrupted run wrote after its last checkpoint.
    """

    def __init__(self, path: str | os.PathLike, *, keep_until: int | None = None) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []
        if keep_until is not None and self.path.exists():
            self.rows = [r for r in read_metrics(self.path) if r["step"] <= keep_until]

    def append(self, row: dict[str, Any]) -> None:
        if "step" not in row or "split" not in row:
            raise ValueError(f"a metrics row needs 'step' and 'split', got keys {sorted(row)}")
        self.rows.append(row)
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.rows)
        atomic_write_bytes(self.path, text.encode())


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a ``metrics.jsonl`` file into a list of rows."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]
    except FileNotFoundError:
        raise VqkitError(f"{path} does not exist") from None
    except (OSError, json.JSONDecodeError) as e:
        raise VqkitError(f"{path} is not a metrics file: {e}") from None


def plot_losses(rows: list[dict[str, Any]], path: str | os.PathLike, key: str = "recon") -> None:
    """Plot training and validation ``key`` against step, log-scaled, to a PNG (Agg, no pyplot)."""
    figure = new_figure(7, 4)
    axes = figure.add_subplot()
    for split, style in (("train", "-"), ("val", "o-")):
        points = [
            (r["step"], r[key])
            for r in rows
            if r["split"] == split and isinstance(r.get(key), float) and math.isfinite(r[key])
        ]
        if points:
            axes.plot(*zip(*points, strict=True), style, label=split, markersize=3)
    if axes.get_lines() and all(min(line.get_ydata()) > 0 for line in axes.get_lines()):
        axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel(f"{key} loss")
    axes.grid(alpha=0.3)
    if axes.get_lines():
        axes.legend()
    figure.tight_layout()
    save_figure(figure, path)


class Throughput:
    """Frames per second of training steps over a sliding window, excluding evaluation time."""

    def __init__(self, world_size: int, window: int = 50) -> None:
        self.world_size, self.window = world_size, window
        self.samples: list[tuple[int, float]] = []

    @contextlib.contextmanager
    def measure(self) -> Iterator[list[int]]:
        frames: list[int] = []
        start = time.perf_counter()
        yield frames
        self.samples = [
            *self.samples[-self.window + 1 :],
            (sum(frames), time.perf_counter() - start),
        ]

    def rate(self) -> float:
        """Frames (batch x segment) per second, summed over all ranks."""
        frames, seconds = (sum(v) for v in zip(*self.samples, strict=True))
        return frames * self.world_size / max(seconds, 1e-9)


class StopOnInterrupt:
    """Turns the first Ctrl-C (SIGINT), SIGTERM or SIGHUP into a request to stop after the
    current step, so the loop can save before exiting; a second signal aborts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.signum: int | None = None  # the first signal's, once one came
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def interrupted(self) -> KeyboardInterrupt:
        """What to raise once stopped: the first signal's :class:`Interrupted`, so the command
        exits with 128 + its number (SIGINT when another rank's signal stopped this one)."""
        return Interrupted(self.signum or signal.SIGINT)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise Interrupted(signum)
        self.signum = signum

    def __enter__(self) -> StopOnInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


def progress(step: int, steps: int, enabled: bool) -> tqdm:
    """A progress bar on rank 0 (loss and frames per second in its postfix); silent elsewhere."""
    return tqdm(
        total=steps,
        initial=step,
        disable=not enabled,
        desc="train",
        unit="step",
        mininterval=1.0,
        dynamic_ncols=True,
    )
