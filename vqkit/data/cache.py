"""The feature cache: its format and :class:`FeatureCache`, its reader. :mod:`vqkit.data.prepare`
builds it from a corpus, and :class:`vqkit.data.dataset.SegmentDataset` serves normalised segments
of it for training.

A cache folder holds

- ``config.json``: the resolved config (audio, features, data, ...) plus ``format_version``;
- ``features/shard-HASH.npy``: float16 raw dB features of up to 32 utterances, frame-major:
  an utterance is the contiguous block ``shard[offset : offset + frames]`` of shape ``(N, F)``
  (float16 keeps dB to about 0.03 dB; shards are written atomically and loaded by memory map);
- ``manifest.jsonl``: one JSON object per utterance: ``path`` (relative to the corpus root),
  ``split``, ``speaker``, ``label``, ``duration`` (s), ``frames``, ``features`` (its shard,
  relative to the cache), ``offset``, ``x_min``, ``x_max`` (the utterance's min-max normaliser
  stats, in dB), and ``text`` where the corpus has it. Rows are appended only after their shard
  is complete, so an interrupted run resumes where it stopped;
- ``stats.json``: per-bin ``mean`` and ``std`` (dB, over the train split, std floored at 1 dB so
  bins that never vary do not blow up on unseen data), counts per split, and the failed files.

An image cache (``features.kind = "image"``, made by :mod:`vqkit.data.image_prepare`) has the same
files, but its shards hold whole images ``(n, C, H, W)``, uint8 0..255 or float16 0..1; a row's
``offset`` is the image's index in its shard (``frames`` is 1) and ``stats.json`` has
per-channel values.
:meth:`FeatureCache.load` and :class:`SegmentDataset` give images ``(C, H, W)`` as float32 in
[-0.5, 0.5], whole (``segment_frames`` does not apply) and with no further normalisation.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

import numpy as np

from vqkit.config import Config, config_to_dict, saved_config_from_dict
from vqkit.data.corpora import SPLITS
from vqkit.errors import VqkitError, shown
from vqkit.files import read_json

FORMAT_VERSION = 1
MANIFEST, CONFIG, STATS, FEATURES = "manifest.jsonl", "config.json", "stats.json", "features"
STD_FLOOR_DB = 1.0
PREPARED_SECTIONS = ("audio", "features", "data")  # a cache is reusable if these agree
# An image shard's value / scale - 0.5 is the pixel in [-0.5, 0.5], by the shard's dtype.
IMAGE_SCALES = {np.dtype(np.uint8): 255.0, np.dtype(np.float16): 1.0}


def safe_relative(path: object, where: str) -> PurePosixPath:
    """``path`` as a relative POSIX path that stays inside its root, else :class:`VqkitError`."""
    if not isinstance(path, str) or not path:
        raise VqkitError(f"{where}: expected a relative path, got {shown(repr(path))}")
    p = PurePosixPath(path)
    if p.is_absolute() or ".." in p.parts or "\\" in path or ":" in p.parts[0]:
        raise VqkitError(
            f"{where}: path {shown(repr(path))} escapes its root; the manifest is not trusted"
        )
    return p


def read_manifest(path: Path) -> list[dict]:
    """Rows of ``manifest.jsonl``, strictly: every line whole JSON with safe paths."""
    rows = []
    if path.exists() and not path.is_file():  # a FIFO would block the read forever
        raise VqkitError(f"{path} is not a regular file; run vqkit prepare again")
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise VqkitError(f"cannot read {path}: {e.strerror or e}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise VqkitError(f"{where} is not valid JSON; run vqkit prepare again") from None
        check_row(row, where)
        rows.append(row)
    return rows


def check_row(row: object, where: str) -> None:
    """Raise :class:`VqkitError` unless ``row`` is a well-formed manifest row."""
    if not isinstance(row, dict):
        raise VqkitError(f"{where}: a manifest row must be a JSON object")
    missing = [k for k in ("path", "split", "frames", "features", "offset") if k not in row]
    if missing:
        raise VqkitError(f"{where}: manifest row lacks {', '.join(missing)}")
    if not all(isinstance(row[k], int) and row[k] >= 0 for k in ("frames", "offset")):
        raise VqkitError(f"{where}: frames and offset must be non-negative integers")
    if row["frames"] == 0:
        raise VqkitError(f"{where}: an item of 0 frames; run vqkit prepare again")
    safe_relative(row["path"], where)
    safe_relative(row["features"], where)
    if row["split"] not in SPLITS:
        raise VqkitError(f"{where}: unknown split {shown(repr(row['split']))}")


class FeatureCache:
    """A feature cache made by ``vqkit prepare`` (read side). Checks the format version."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not (self.root / CONFIG).is_file():
            raise VqkitError(
                f"{self.root} is not a vqkit feature cache (no {CONFIG}); "
                f"make one with: vqkit prepare SRC {self.root}"
            )
        raw = read_json(self.root / CONFIG)
        _check_version(raw, self.root / CONFIG)
        sections = {k: v for k, v in raw.items() if k in _sections()}
        self.config: Config = saved_config_from_dict(sections)
        if not (self.root / STATS).is_file():
            raise VqkitError(
                f"{self.root} is incomplete (no {STATS}): run vqkit prepare again to finish it"
            )
        self.info: dict = read_json(self.root / STATS)
        _check_version(self.info, self.root / STATS)
        image = self.config.features.kind == "image"  # images are not normalised by these
        self.stats: dict[str, np.ndarray] = _read_stats(self.info, self.root / STATS, not image)
        self._rows = read_manifest(self.root / MANIFEST)

    def items(self, split: str) -> list[dict]:
        """The manifest rows of ``split`` ("train" | "val" | "test"), sorted by path."""
        if split not in SPLITS:
            raise VqkitError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        return [row for row in self._rows if row["split"] == split]

    def load(self, item: dict) -> np.ndarray:
        """The raw features of one manifest row: ``(F, N)`` float32 in dB; in an image cache
        the image ``(C, H, W)`` float32 in [-0.5, 0.5]."""
        path = self.root / safe_relative(item["features"], f"{self.root / MANIFEST}")
        start, n_bins = item["offset"], self.stats["mean"].shape[0]
        if not path.is_file():  # missing, or a FIFO that would block np.load forever
            raise VqkitError(f"{path}: no such shard file; run vqkit prepare again")
        try:
            shard = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise VqkitError(
                f"{path}: cannot read features ({e}); run vqkit prepare again"
            ) from None
        if self.config.features.kind == "image":
            return _image(shard, item, path)
        if shard.ndim != 2 or shard.shape[1] != n_bins or start + item["frames"] > shard.shape[0]:
            raise VqkitError(
                f"{path}: shard of shape {shard.shape} cannot hold {item['frames']} frames of "
                f"{n_bins} bins at offset {start}; run vqkit prepare again into a new folder"
            )
        return np.ascontiguousarray(shard[start : start + item["frames"]].T, dtype=np.float32)

    def __repr__(self) -> str:
        counts = ", ".join(f"{len(self.items(s))} {s}" for s in SPLITS)
        return f"FeatureCache({str(self.root)!r}: {counts})"


def _image(shard: np.ndarray, item: dict, path: Path) -> np.ndarray:
    """Image ``offset`` of an image shard ``(n, C, H, W)`` (uint8 0..255 or float16 0..1) as
    ``(C, H, W)`` float32 in [-0.5, 0.5]."""
    scale = IMAGE_SCALES.get(shard.dtype)
    if shard.ndim != 4 or scale is None or item["offset"] >= shard.shape[0]:
        raise VqkitError(
            f"{path}: {shard.dtype} shard of shape {shard.shape} has no image {item['offset']}; "
            "run vqkit prepare again into a new folder"
        )
    return np.asarray(shard[item["offset"]], dtype=np.float32) / scale - 0.5


def _read_stats(info: object, path: Path, positive_std: bool) -> dict[str, np.ndarray]:
    """``mean`` and ``std`` of ``stats.json``: equal-length lists of finite numbers (std > 0
    when ``positive_std``)."""
    stats = {}
    for key in ("mean", "std"):
        value = info.get(key) if isinstance(info, dict) else None
        if not isinstance(value, list) or not value:
            raise VqkitError(f"{path}: '{key}' must be a list of numbers; run vqkit prepare again")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
            raise VqkitError(f"{path}: '{key}' holds something other than numbers: damaged")
        stats[key] = np.asarray(value, dtype=np.float32)
        if not np.isfinite(stats[key]).all():
            raise VqkitError(f"{path}: '{key}' holds NaN or Inf: damaged")
    if stats["mean"].shape != stats["std"].shape:
        raise VqkitError(
            f"{path}: 'mean' has {stats['mean'].size} values but 'std' {stats['std'].size}: damaged"
        )
    if positive_std and (stats["std"] <= 0).any():
        raise VqkitError(f"{path}: 'std' must be positive: damaged; run vqkit prepare again")
    return stats


def _sections() -> tuple[str, ...]:
    return tuple(config_to_dict(Config()))


def _check_version(raw: object, path: Path) -> None:
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if version != FORMAT_VERSION:
        raise VqkitError(
            f"{path} has feature cache format {version!r}; this vqkit reads format "
            f"{FORMAT_VERSION}: run vqkit prepare again into a new folder"
        )
