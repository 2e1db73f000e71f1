"""The feature cache: ``prepare`` builds it from a corpus, :class:`FeatureCache` reads it, and
:class:`SegmentDataset` serves normalised segments of it for training.

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

An image cache (``features.kind = "image"``, made by :mod:`vqkit.image_cache`) has the same
files, but its shards hold whole images ``(n, C, H, W)``, uint8 0..255 or float16 0..1; a row's
``offset`` is the image's index in its shard (``frames`` is 1) and ``stats.json`` has
per-channel values.
:meth:`FeatureCache.load` and :class:`SegmentDataset` give images ``(C, H, W)`` as float32 in
[-0.5, 0.5], whole (``segment_frames`` does not apply) and with no further normalisation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from torch import Tensor

from vqkit.config import Config, config_from_dict, config_to_dict
from vqkit.corpora import IMAGE_LAYOUTS, SPLITS
from vqkit.errors import VqkitError
from vqkit.features import DB_FLOOR, Normaliser
from vqkit.files import read_json

FORMAT_VERSION = 1
MANIFEST, CONFIG, STATS, FEATURES = "manifest.jsonl", "config.json", "stats.json", "features"
STD_FLOOR_DB = 1.0
PREPARED_SECTIONS = ("audio", "features", "data")  # a cache is reusable if these agree
# An image shard's value / scale - 0.5 is the pixel in [-0.5, 0.5], by the shard's dtype.
IMAGE_SCALES = {np.dtype(np.uint8): 255.0, np.dtype(np.float16): 1.0}


@dataclass
class PrepareSummary:
    """What :func:`prepare` did. ``n_ok`` counts the utterances in the cache (new and earlier
    ones), ``n_skipped`` those of them already prepared by an earlier run, ``n_failed`` the files
    that could not be read, listed in ``failed`` as ``(path, reason)``."""

    n_ok: int
    n_skipped: int
    n_failed: int
    failed: list[tuple[str, str]]
    out: Path
    layout: str = ""
    splits: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time and summed worker time

    def describe(self) -> str:
        """A few lines for people: counts, splits, time and the failed files by name."""
        splits = ", ".join(f"{self.splits.get(s, 0)} {s}" for s in SPLITS)
        what = "images" if self.layout in IMAGE_LAYOUTS else "utterances"
        lines = [
            f"prepared {self.n_ok} {what} ({self.layout}; {splits}) in {self.out}: "
            f"{self.n_ok - self.n_skipped} new, {self.n_skipped} already done, "
            f"{self.n_failed} failed; {self.seconds.get('wall', 0.0):.1f} s"
        ]
        lines += [f"  failed: {path}: {reason}" for path, reason in self.failed[:20]]
        if self.n_failed > 20:
            lines.append(f"  ... and {self.n_failed - 20} more (all listed in stats.json)")
        return "\n".join(lines)


def prepare(
    src: str | Path, out: str | Path, config: Config, workers: int = 1, progress: bool = True
) -> PrepareSummary:
    """Build (or finish) the feature cache ``out`` from the corpus ``src`` with ``workers``
    processes and a progress bar; see :mod:`vqkit.prepare` (resuming) and :mod:`vqkit.corpora`
    (layouts and splits)."""
    from vqkit.prepare import run_prepare  # the writer side: layouts, workers, progress

    return run_prepare(Path(src), Path(out), config, workers=workers, progress=progress)


def safe_relative(path: object, where: str) -> PurePosixPath:
    """``path`` as a relative POSIX path that stays inside its root, else :class:`VqkitError`."""
    if not isinstance(path, str) or not path:
        raise VqkitError(f"{where}: expected a relative path, got {path!r}")
    p = PurePosixPath(path)
    if p.is_absolute() or ".." in p.parts or "\\" in path or ":" in p.parts[0]:
        raise VqkitError(f"{where}: path {path!r} escapes its root; the manifest is not trusted")
    return p


def read_manifest(path: Path) -> list[dict]:
    """Rows of ``manifest.jsonl``, strictly: every line whole JSON with safe paths."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
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
    safe_relative(row["path"], where)
    safe_relative(row["features"], where)
    if row["split"] not in SPLITS:
        raise VqkitError(f"{where}: unknown split {row['split']!r}")


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
        self.config: Config = config_from_dict({k: v for k, v in raw.items() if k in _sections()})
        if not (self.root / STATS).is_file():
            raise VqkitError(
                f"{self.root} is incomplete (no {STATS}): run vqkit prepare again to finish it"
            )
        self.info: dict = read_json(self.root / STATS)
        _check_version(self.info, self.root / STATS)
        self.stats: dict[str, np.ndarray] = {
            key: np.asarray(self.info[key], dtype=np.float32) for key in ("mean", "std")
        }
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


def make_normaliser(cache: FeatureCache) -> Normaliser:
    """The normaliser the cache's config names, with the cache's train-split mean and std, so
    training and the codec (de)normalise exactly as :class:`SegmentDataset` does."""
    return Normaliser(
        cache.config.features.normalise,
        mean=torch.from_numpy(cache.stats["mean"]),
        std=torch.from_numpy(cache.stats["std"]),
    )


def item_side_info(normaliser: Normaliser, item: dict) -> Tensor:
    """The side information of a manifest row for ``normaliser``: ``(n_side,)``."""
    if normaliser.n_side == 0:
        return torch.zeros(0)
    return torch.tensor([item["x_min"], item["x_max"]], dtype=torch.float32)


class SegmentDataset(torch.utils.data.Dataset):
    """Normalised ``(F, segment_frames)`` float32 segments of one split of a cache.

    ``train=True`` crops at random (numpy generator seeded by ``seed`` and, in DataLoader workers,
    by the worker's seed); ``train=False`` takes the start. Shorter items are padded after their
    end with the quietest value before normalising: -100 dB (silence) for "none" and "meanstd",
    the item's own minimum for the min-max kinds (so the padding normalises to ``low``).
    ``segment_frames == 0`` gives whole items; batch them with :meth:`collate`. An image cache
    gives whole images ``(C, H, W)`` in [-0.5, 0.5] whatever ``segment_frames`` is.
    """

    def __init__(
        self,
        cache: FeatureCache,
        split: str,
        segment_frames: int,
        train: bool = True,
        seed: int = 0,
    ) -> None:
        if segment_frames < 0:
            raise VqkitError(f"segment_frames must be >= 0, got {segment_frames}")
        self.cache, self.split, self.segment_frames = cache, split, segment_frames
        self.train, self.seed = train, seed
        self.items = cache.items(split)
        self.normaliser = make_normaliser(cache)
        self._rng: np.random.Generator | None = None
        self._rng_owner: object = None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Tensor:
        item = self.items[index]
        x = torch.from_numpy(self.cache.load(item))
        if self.cache.config.features.kind == "image":
            return x
        quiet = item["x_min"] if self.normaliser.n_side else DB_FLOOR
        n = self.segment_frames
        if n > 0 and x.shape[1] > n:
            start = int(self._generator().integers(0, x.shape[1] - n + 1)) if self.train else 0
            x = x[:, start : start + n]
        elif n > 0 and x.shape[1] < n:
            x = torch.nn.functional.pad(x, (0, n - x.shape[1]), value=quiet)
        side = item_side_info(self.normaliser, item)[None]
        with torch.no_grad():
            return self.normaliser.normalise(x[None], side)[0].contiguous()

    def collate(self, batch: list[Tensor]) -> Tensor:
        """Stack normalised items ``(F, N_i)`` into ``(B, F, max N_i)``, padding as above."""
        longest = max(x.shape[-1] for x in batch)
        pad = self._pad_value(batch[0])
        out = pad[None, :, None].repeat(len(batch), 1, longest)
        for i, x in enumerate(batch):
            out[i, :, : x.shape[-1]] = x
        return out

    def _pad_value(self, like: Tensor) -> Tensor:
        """The normalised padding value per bin ``(F,)``."""
        if self.normaliser.n_side:
            return torch.full(like.shape[:1], self.normaliser.low)
        silence = torch.full((1, like.shape[0], 1), DB_FLOOR)
        return self.normaliser.normalise(silence)[0, :, 0]

    def _generator(self) -> np.random.Generator:
        info = torch.utils.data.get_worker_info()
        owner = (info.id, info.seed) if info is not None else None
        if self._rng is None or owner != self._rng_owner:
            entropy = [self.seed] if info is None else [self.seed, info.seed]
            self._rng, self._rng_owner = np.random.default_rng(entropy), owner
        return self._rng


def _sections() -> tuple[str, ...]:
    return tuple(config_to_dict(Config()))


def _check_version(raw: object, path: Path) -> None:
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if version != FORMAT_VERSION:
        raise VqkitError(
            f"{path} has feature cache format {version!r}; this vqkit reads format "
            f"{FORMAT_VERSION}: run vqkit prepare again into a new folder"
        )
