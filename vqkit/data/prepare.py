"""Writing a feature cache (``vqkit prepare``); :mod:`vqkit.data.cache` describes its layout.

Utterances are prepared in chunks of :data:`SHARD_ITEMS`; each chunk becomes one features shard,
written atomically (one fsync per shard, not per file), and its manifest rows are appended and
flushed only after the shard is complete. So after a crash or ``kill -9`` a rerun keeps every row
whose shard exists, drops a torn last line, and prepares the rest. Undecodable files are reported by
name, skipped and counted; they are retried by the next run.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vqkit.audio.frontends import make_frontend
from vqkit.audio.io import fix_length, read_audio
from vqkit.config import Config
from vqkit.data.cache import (
    FEATURES,
    FORMAT_VERSION,
    MANIFEST,
    STATS,
    STD_FLOOR_DB,
    check_row,
)
from vqkit.data.corpora import SPLITS, Utterance, inside_root, list_corpus
from vqkit.data.image_prepare import prepare_images
from vqkit.data.images import find_image_layout
from vqkit.data.writer import PrepareSummary, locked, remove_unused_shards, shard_name, write_config
from vqkit.errors import VqkitError, shown
from vqkit.files import atomic_path, atomic_write_bytes, check_output, write_json
from vqkit.limits import check_threads

SHARD_ITEMS = 32  # utterances per features file: fewer files and fsyncs, small resume loss


def prepare(
    src: str | Path, out: str | Path, config: Config, workers: int = 1, progress: bool = True
) -> PrepareSummary:
    """Build (or finish) the feature cache ``out`` from the corpus ``src`` with ``workers``
    processes and a progress bar: every utterance not yet in the cache (see the module docstring
    for resuming, :mod:`vqkit.data.corpora` for layouts and splits)."""
    src, out = Path(src), Path(out)
    start = time.perf_counter()
    check_threads(workers, "--workers")
    check_output(out, src)
    image_layout = find_image_layout(src, config.data.layout)
    if image_layout is not None:
        return prepare_images(src, out, config, image_layout, progress=progress)
    if config.features.kind == "image":
        raise VqkitError(f"features.kind 'image' needs an image corpus; {src} holds audio")
    check_config(config)
    layout, utterances = list_corpus(src, config.data)
    seconds = {"list": time.perf_counter() - start}
    with locked(out):
        write_config(out, config)
        done = _resume(out, {u.path: u for u in utterances})
        todo = [u for u in utterances if u.path not in done]
        bar = {"total": len(utterances), "initial": len(done), "disable": not progress}
        new, failed, work = _process(src, out, config, todo, workers, bar)
        seconds.update(work)
        rows = sorted([*done.values(), *new], key=lambda row: row["path"])
        lines = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)
        atomic_write_bytes(out / MANIFEST, lines.encode())
        remove_unused_shards(out, rows)
        mark = time.perf_counter()
        if rows:
            write_json(out / STATS, dataset_stats(out, rows, layout, failed))
        seconds["stats"] = time.perf_counter() - mark
    seconds["wall"] = time.perf_counter() - start
    splits = Counter(row["split"] for row in rows)
    return PrepareSummary(
        len(rows), len(done), len(failed), failed, out, layout, dict(splits), seconds
    )


def check_config(config: Config) -> None:
    """Raise :class:`VqkitError` for settings ``prepare`` cannot use, before any work."""
    if config.audio.duration < 0 or config.audio.sample_rate < 1:
        raise VqkitError("audio.duration must be >= 0 and audio.sample_rate >= 1")
    make_frontend(config.features, config.audio.sample_rate)  # checks the STFT settings


def _resume(out: Path, planned: dict[str, Utterance]) -> dict[str, dict]:
    """Rows of an earlier run that are still valid, by path; rewrites a clean manifest."""
    for stray in (out / FEATURES).glob(".*.tmp"):  # temporary files of killed writers
        stray.unlink(missing_ok=True)
    done: dict[str, dict] = {}
    if (out / MANIFEST).exists():
        for line in (out / MANIFEST).read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                check_row(row, str(out / MANIFEST))
            except (json.JSONDecodeError, VqkitError):
                continue  # a torn last line from a killed run, or a row we did not write
            u = planned.get(row["path"])
            if u is not None and u.split == row["split"] and (out / row["features"]).is_file():
                done[u.path] = row
    rows = sorted(done.values(), key=lambda row: row["path"])
    atomic_write_bytes(out / MANIFEST, "".join(json.dumps(r) + "\n" for r in rows).encode())
    return done


@dataclass
class _Result:
    path: str
    row: dict | None
    reason: str | None


@dataclass
class _Chunk:
    results: list[_Result]
    seconds: dict[str, float] = field(default_factory=dict)


def _process(
    src: Path, out: Path, config: Config, todo: list[Utterance], workers: int, bar: dict
) -> tuple[list[dict], list[tuple[str, str]], dict[str, float]]:
    """Prepare ``todo`` in shards, appending manifest rows as each shard completes."""
    rows, failed = [], []
    seconds: Counter[str] = Counter()
    start = time.perf_counter()
    chunks = [todo[i : i + SHARD_ITEMS] for i in range(0, len(todo), SHARD_ITEMS)]
    with (
        _chunk_results(src, out, config, chunks, workers) as results,
        open(out / MANIFEST, "a", encoding="utf-8") as manifest,
        tqdm(unit="file", desc="prepare", smoothing=0.05, **bar) as progress,
    ):
        for chunk in results:
            for result in chunk.results:
                if result.row is not None:
                    manifest.write(json.dumps(result.row) + "\n")
                    rows.append(result.row)
                else:
                    failed.append((result.path, result.reason or "unknown error"))
                    progress.write(
                        f"vqkit: skipping {shown(result.path)}: {shown(result.reason, None)}"
                    )
            manifest.flush()
            seconds.update(chunk.seconds)
            progress.update(len(chunk.results))
    seconds["process"] = time.perf_counter() - start
    return rows, sorted(failed), dict(seconds)


@contextlib.contextmanager
def _chunk_results(
    src: Path, out: Path, config: Config, chunks: list[list[Utterance]], workers: int
) -> Iterator[Iterator[_Chunk]]:
    """Results in completion order, from this process or a pool made before any progress bar."""
    if workers == 1 or len(chunks) < 2:
        worker = _Worker(src, out, config)
        yield (worker(chunk) for chunk in chunks)
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=(src, out, config)) as pool:
        yield pool.imap_unordered(_work, chunks)
        pool.close()  # all results are in: let the workers finish rather than kill them, since
        pool.join()  # a worker killed while it holds the task queue's lock leaves the others hung


class _Worker:
    """Prepares a chunk of utterances into one shard; never raises for a bad file."""

    def __init__(self, src: Path, out: Path, config: Config) -> None:
        self.src, self.out, self.audio = src, out, config.audio
        self.frontend = make_frontend(config.features, config.audio.sample_rate).eval()

    def __call__(self, chunk: list[Utterance]) -> _Chunk:
        seconds: Counter[str] = Counter()
        results, blocks, offset = [], [], 0
        for u in chunk:
            result, x = self.features(u, seconds)
            if x is not None:
                result.row.update(offset=offset, frames=int(x.shape[1]))
                blocks.append(x.T)
                offset += x.shape[1]
            results.append(result)
        if blocks:
            start = time.perf_counter()
            name = shard_name([r.path for r in results if r.row is not None])
            with atomic_path(self.out / name) as tmp, open(tmp, "wb") as f:
                np.save(f, np.concatenate(blocks), allow_pickle=False)
            for result in results:
                if result.row is not None:
                    result.row["features"] = name
            seconds["write"] += time.perf_counter() - start
        return _Chunk(results, dict(seconds))

    def features(self, u: Utterance, seconds: Counter[str]) -> tuple[_Result, np.ndarray | None]:
        """One utterance's float16 features ``(F, N)`` and its row, or the reason it failed."""
        times = [time.perf_counter()]
        try:
            wave, rate = read_audio(inside_root(self.src, u.path), self.audio.sample_rate)
        except VqkitError as e:
            return _Result(u.path, None, str(e).removeprefix(f"{self.src / u.path}: ")), None
        if self.audio.duration > 0:
            n = round(self.audio.duration * rate)
            wave = fix_length(wave, n, side=self.audio.pad_side, mode=self.audio.pad_mode)
        times.append(time.perf_counter())
        with torch.no_grad():
            x = self.frontend(torch.from_numpy(wave))[0].numpy().astype(np.float16)
        times.append(time.perf_counter())
        seconds["read"] += times[1] - times[0]
        seconds["features"] += times[2] - times[1]
        row = {
            "path": u.path,
            "split": u.split,
            "speaker": u.speaker,
            "label": u.label,
            "duration": round(len(wave) / rate, 6),
            "x_min": float(x.min()),  # of the stored float16 values
            "x_max": float(x.max()),
        }
        if u.text is not None:
            row["text"] = u.text
        return _Result(u.path, row, None), x


_WORKER: _Worker | None = None


def _init_worker(src: Path, out: Path, config: Config) -> None:
    """Set up a pool process: one torch thread (one process per core; this also keeps forked
    workers off OpenMP), the default SIGTERM and SIGHUP (a forked worker inherits the CLI's
    handlers, and the pool stops workers with SIGTERM), and Ctrl-C left to the parent."""
    global _WORKER
    torch.set_num_threads(1)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER = _Worker(src, out, config)


def _work(chunk: list[Utterance]) -> _Chunk:
    assert _WORKER is not None
    return _WORKER(chunk)


def dataset_stats(out: Path, rows: list[dict], layout: str, failed: list[tuple[str, str]]) -> dict:
    """``stats.json``: per-bin mean and std over the train split (all rows if it is empty)."""
    train = [row for row in rows if row["split"] == "train"]
    shift, total, total_sq, n = None, 0.0, 0.0, 0
    by_shard: dict[str, list[dict]] = {}
    for row in train or rows:
        by_shard.setdefault(row["features"], []).append(row)
    for name, shard_rows in by_shard.items():
        shard = np.load(out / name, allow_pickle=False)
        x = np.concatenate([shard[r["offset"] : r["offset"] + r["frames"]] for r in shard_rows])
        x = x.astype(np.float64)  # (frames, F)
        shift = x.mean(axis=0) if shift is None else shift  # shifted sums stay accurate
        d = x - shift
        total, total_sq, n = total + d.sum(axis=0), total_sq + (d * d).sum(axis=0), n + len(x)
    mean = shift + total / n
    std = np.sqrt(np.maximum(total_sq / n - (total / n) ** 2, 0.0))
    duration: Counter[str] = Counter()
    for row in rows:
        duration[row["split"]] += row["duration"]
    return {
        "format_version": FORMAT_VERSION,
        "layout": layout,
        "stats_split": "train" if train else "all",
        "n_frames": n,
        "mean": mean.tolist(),
        "std": np.maximum(std, STD_FLOOR_DB).tolist(),
        "std_floor_db": STD_FLOOR_DB,
        "n_items": {s: sum(row["split"] == s for row in rows) for s in SPLITS},
        "seconds": {s: round(duration[s], 3) for s in SPLITS},
        "n_failed": len(failed),
        "failed": [list(item) for item in failed],
    }
