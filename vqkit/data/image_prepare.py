"""Writing an image cache: ``vqkit prepare`` with an image layout (see :mod:`vqkit.data.images`).

The cache is the one of :mod:`vqkit.data.cache`, with ``features.kind = "image"`` and no
normalisation:
shards ``features/shard-HASH.npy`` hold ``(n, C, H, W)`` uint8 (0..255) or float16 (0..1) images,
a manifest row's ``offset`` is its image's index in its shard and ``frames`` is 1, and
``stats.json`` has the per-channel mean and std of the train pixels in [-0.5, 0.5]. The images are
in memory or quick to decode, so a rerun rebuilds the cache whole (same shard names, same rows).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vqkit.config import AudioConfig, Config, FeatureConfig
from vqkit.data.cache import FEATURES, FORMAT_VERSION, IMAGE_SCALES, MANIFEST, STATS
from vqkit.data.corpora import SPLITS, Utterance, assign_splits, select
from vqkit.data.images import ImageCorpus, list_images
from vqkit.data.writer import PrepareSummary, locked, remove_unused_shards, shard_name, write_config
from vqkit.errors import VqkitError
from vqkit.files import atomic_path, atomic_write_bytes, write_json

SHARD_IMAGES = 1024  # images per features file


def image_config(config: Config) -> Config:
    """``config`` as an image cache records it: ``features.kind = "image"``, no normalisation
    (pixels are scaled to [-0.5, 0.5]) and the default audio and front-end keys, which do not
    apply to images."""
    if config.data.speaker_disjoint:
        raise VqkitError("data.speaker_disjoint does not apply to images (they have no speaker)")
    features = FeatureConfig(kind="image", normalise="none")
    return dataclasses.replace(config, audio=AudioConfig(), features=features)


def prepare_images(
    src: str | Path, out: str | Path, config: Config, layout: str, progress: bool = True
) -> PrepareSummary:
    """Build the image cache ``out`` from the corpus ``src`` in the image ``layout``."""
    start = time.perf_counter()
    src, out, config = Path(src), Path(out), image_config(config)
    corpus = list_images(src, layout)
    items = assign_splits(select(corpus.items, config.data), config.data, official=True)
    seconds = {"list": time.perf_counter() - start}
    with locked(out):
        write_config(out, config)
        for stray in (out / FEATURES).glob(".*.tmp"):  # temporary files of killed writers
            stray.unlink(missing_ok=True)
        rows, failed = _write_shards(out, corpus, items, progress)
        failed = sorted([*corpus.failed, *failed])
        text = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)
        atomic_write_bytes(out / MANIFEST, text.encode())
        remove_unused_shards(out, rows)
        if rows:
            write_json(out / STATS, image_stats(out, rows, layout, failed))
    seconds["wall"] = time.perf_counter() - start
    splits = dict(Counter(row["split"] for row in rows))
    return PrepareSummary(len(rows), 0, len(failed), failed, out, layout, splits, seconds)


def _write_shards(
    out: Path, corpus: ImageCorpus, items: list[Utterance], progress: bool
) -> tuple[list[dict], list[tuple[str, str]]]:
    """Write ``items`` in shards of :data:`SHARD_IMAGES`; returns the manifest rows and the
    images that could not be read."""
    rows, failed = [], []
    first: np.ndarray | None = None
    with tqdm(total=len(items), unit="image", desc="prepare", disable=not progress) as bar:
        for start in range(0, len(items), SHARD_IMAGES):
            images, kept = [], []
            for u in items[start : start + SHARD_IMAGES]:
                try:
                    x = corpus.read(u.path)
                except VqkitError as e:
                    failed.append((u.path, str(e)))
                    continue
                first = x if first is None else first
                if x.shape != first.shape or x.dtype != first.dtype:
                    failed.append((u.path, f"{x.dtype} {x.shape}, unlike {first.shape}"))
                    continue
                images.append(x)
                kept.append(u)
            if kept:
                name = shard_name([u.path for u in kept])
                with atomic_path(out / name) as tmp, open(tmp, "wb") as f:
                    np.save(f, np.stack(images), allow_pickle=False)
                rows += [_row(u, name, i, images[i].shape) for i, u in enumerate(kept)]
            bar.update(min(SHARD_IMAGES, len(items) - start))
    return rows, failed


def _row(u: Utterance, features: str, offset: int, shape: tuple[int, ...]) -> dict:
    return {
        "path": u.path,
        "split": u.split,
        "speaker": u.speaker,
        "label": u.label,
        "features": features,
        "offset": offset,
        "frames": 1,
        "shape": list(shape),
    }


def image_stats(out: Path, rows: list[dict], layout: str, failed: list[tuple[str, str]]) -> dict:
    """``stats.json`` of an image cache: per-channel mean and std of the train pixels (all rows
    when there is no train split) in [-0.5, 0.5]."""
    train = [row for row in rows if row["split"] == "train"]
    by_shard: dict[str, list[int]] = {}
    for row in train or rows:
        by_shard.setdefault(row["features"], []).append(row["offset"])
    total, total_sq, n = 0.0, 0.0, 0
    for name, offsets in by_shard.items():
        shard = np.load(out / name, allow_pickle=False)
        x = shard[offsets].astype(np.float64) / IMAGE_SCALES[shard.dtype] - 0.5  # (n, C, H, W)
        total = total + x.sum(axis=(0, 2, 3))
        total_sq = total_sq + (x * x).sum(axis=(0, 2, 3))
        n += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / n
    std = np.sqrt(np.maximum(total_sq / n - mean**2, 0.0))
    return {
        "format_version": FORMAT_VERSION,
        "layout": layout,
        "kind": "image",
        "shape": rows[0]["shape"],
        "stats_split": "train" if train else "all",
        "mean": mean.tolist(),
        "std": std.tolist(),
        "n_items": {s: sum(row["split"] == s for row in rows) for s in SPLITS},
        "n_failed": len(failed),
        "failed": [list(item) for item in failed],
    }
