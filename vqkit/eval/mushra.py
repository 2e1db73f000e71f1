"""Aggregating MUSHRA ratings (ITU-R BS.1534-3) saved by the ``vqkit listen`` page.

Post-screening as the recommendation specifies: a listener who rates the hidden reference below
90 in more than 15 % of the trials they rated is dropped. Then, per condition, the mean over
every kept (listener, trial) rating and its 95 % confidence interval from Student's t
(half-width ``t(0.975, n - 1) * s / sqrt(n)``).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from vqkit.errors import VqkitError
from vqkit.files import atomic_write_bytes, new_figure, read_json, save_figure

HIDDEN = "hidden-reference"  # the reference, rated blind among the conditions
ANCHORS = {"anchor-3.5k": 3500, "anchor-7k": 7000}  # BS.1534-3 low-pass anchors (cut-off, Hz)
SCREEN_SCORE = 90.0  # a hidden reference rated below this counts against its listener
SCREEN_FRACTION = 0.15  # ... in more than this fraction of their trials drops the listener
CSV_KEYS = ("condition", "family", "kbps", "n", "listeners", "mean", "ci95", "std")


@dataclasses.dataclass(frozen=True)
class Rating:
    """One score (0..100) a listener gave one condition in one trial."""

    listener: str
    trial: str
    condition: str
    score: float
    time: str


def read_ratings(paths: Sequence[str | Path], test: str | None = None) -> list[Rating]:
    """The ratings in the page's JSON files (``format: vqkit-listening``); with ``test``, every
    file must come from that test. A rating given twice keeps the later one."""
    latest: dict[tuple[str, str, str], Rating] = {}
    for path in map(Path, paths):
        for rating in _read_file(path, test):
            key = (rating.listener, rating.trial, rating.condition)
            if key not in latest or rating.time >= latest[key].time:
                latest[key] = rating
    if not latest:
        raise VqkitError("the ratings files hold no ratings")
    return list(latest.values())


def _read_file(path: Path, test: str | None) -> list[Rating]:
    data = read_json(path)
    if not isinstance(data, dict) or data.get("format") != "vqkit-listening":
        raise VqkitError(f"{path} is not a vqkit listening-test result")
    if test is not None and data.get("test") != test:
        raise VqkitError(f"{path} is from another listening test ({data.get('test')}, not {test})")
    try:
        return [
            Rating(
                str(r["listener"]),
                str(r["trial"]),
                str(r["condition"]),
                float(r["score"]),
                str(r["time"]),
            )
            for r in data["ratings"]
        ]
    except (KeyError, TypeError, ValueError) as e:
        raise VqkitError(f"{path}: a malformed rating ({type(e).__name__}: {e})") from None


def screen(ratings: Sequence[Rating]) -> tuple[list[Rating], dict[str, str]]:
    """BS.1534-3 post-screening: the ratings of the kept listeners, and why each dropped one
    was dropped."""
    dropped = {}
    for listener in dict.fromkeys(r.listener for r in ratings):
        hidden = [r.score for r in ratings if r.listener == listener and r.condition == HIDDEN]
        if not hidden:
            dropped[listener] = "never rated the hidden reference"
            continue
        low = sum(score < SCREEN_SCORE for score in hidden)
        if low / len(hidden) > SCREEN_FRACTION:
            dropped[listener] = (
                f"rated the hidden reference below {SCREEN_SCORE:g} in {low} of "
                f"{len(hidden)} trials (more than {100 * SCREEN_FRACTION:g} %)"
            )
    return [r for r in ratings if r.listener not in dropped], dropped


def confidence_95(scores: Sequence[float]) -> float | None:
    """Half-width of the 95 % confidence interval of the mean (Student's t); None for n < 2."""
    n = len(scores)
    if n < 2:
        return None
    return float(stats.t.ppf(0.975, n - 1) * np.std(scores, ddof=1) / math.sqrt(n))


def aggregate(ratings: Sequence[Rating], bench: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per condition, in the bench's system order after the reference and anchors:
    ``condition``, ``family``, ``kbps`` (bench mean, None without a bitstream), ``n``,
    ``listeners``, ``mean``, ``ci95`` (half-width), ``std``."""
    summary = {r["system"]: r for r in bench.get("summary", [])}
    order = [HIDDEN, *ANCHORS, *summary]
    conditions = sorted(
        dict.fromkeys(r.condition for r in ratings),
        key=lambda c: order.index(c) if c in order else len(order),
    )
    rows = []
    for condition in conditions:
        mine = [r for r in ratings if r.condition == condition]
        scores = [r.score for r in mine]
        system = summary.get(condition, {})
        family = system.get("family") or ("reference" if condition == HIDDEN else "anchor")
        rows.append(
            {
                "condition": condition,
                "family": family,
                "kbps": system.get("kbps"),
                "n": len(scores),
                "listeners": len({r.listener for r in mine}),
                "mean": float(np.mean(scores)),
                "ci95": confidence_95(scores),
                "std": float(np.std(scores, ddof=1)) if len(scores) > 1 else None,
            }
        )
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The aggregate as a fixed-width text table."""
    header = ["condition", "kbit/s", "n", "mean", "95% CI"]
    body = [
        [
            r["condition"],
            "-" if r["kbps"] is None else f"{r['kbps']:.2f}",
            str(r["n"]),
            f"{r['mean']:.1f}",
            "-" if r["ci95"] is None else f"±{r['ci95']:.1f}",
        ]
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)) for line in [header, *body]
    ]
    return "\n".join(line.rstrip() for line in lines)


def to_csv(rows: Sequence[dict[str, Any]]) -> str:
    """The aggregate as CSV text (an empty cell where a value is undefined)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, CSV_KEYS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row[k] is None else row[k] for k in CSV_KEYS})
    return buffer.getvalue()


def plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Mean ratings with 95 % intervals against kbit/s, one curve per system family; the hidden
    reference, the anchors and systems without a bitstream as horizontal lines with bands."""
    figure = new_figure(8, 5, dpi=80)
    axes = figure.add_subplot(1, 1, 1)
    for family in dict.fromkeys(r["family"] for r in rows if r["kbps"] is not None):
        points = sorted(
            (r["kbps"], r["mean"], r["ci95"] or 0.0)
            for r in rows
            if r["family"] == family and r["kbps"] is not None
        )
        x, y, err = zip(*points, strict=True)
        axes.errorbar(x, y, yerr=err, fmt="o-", capsize=3, markersize=4, label=family)
    lines = [r for r in rows if r["kbps"] is None]
    for i, row in enumerate(lines):
        colour = "black" if row["condition"] == HIDDEN else f"C{(i + 3) % 10}"
        axes.axhline(row["mean"], linestyle="--", linewidth=1, color=colour, label=row["condition"])
        half = row["ci95"] or 0.0
        axes.axhspan(row["mean"] - half, row["mean"] + half, color=colour, alpha=0.08)
    axes.set_ylim(0, 100)
    axes.set_xlabel("measured kbit/s (payload)")
    axes.set_ylabel("MUSHRA score (mean, 95 % CI)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    save_figure(figure, path)


def write_outputs(out: Path, rows: Sequence[dict[str, Any]]) -> tuple[Path, Path]:
    """``OUT/listening.csv`` and ``OUT/listening.png``; returns both paths."""
    atomic_write_bytes(out / "listening.csv", to_csv(rows).encode())
    plot(rows, out / "listening.png")
    return out / "listening.csv", out / "listening.png"
