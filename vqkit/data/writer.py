"""The shared side of writing a feature cache, for speech (:mod:`vqkit.data.prepare`) and images
(:mod:`vqkit.data.image_prepare`): the folder lock, the config check, shard names and clean-up, and
the summary of a run."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vqkit.config import SAVED_BEFORE, Config, config_to_dict
from vqkit.data.cache import CONFIG, FEATURES, FORMAT_VERSION, PREPARED_SECTIONS
from vqkit.data.corpora import IMAGE_LAYOUTS, SPLITS
from vqkit.errors import VqkitError, shown
from vqkit.files import read_json, write_json


@dataclass
class PrepareSummary:
    """What :func:`vqkit.data.prepare.prepare` did. ``n_ok`` counts the utterances in the cache (new
    and earlier
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
        lines += [f"  failed: {shown(path)}: {shown(why, None)}" for path, why in self.failed[:20]]
        if self.n_failed > 20:
            lines.append(f"  ... and {self.n_failed - 20} more (all listed in stats.json)")
        return "\n".join(lines)


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out`` (POSIX record locks die with their process and are not
    inherited by forked workers); the lock file is removed on the way out, whatever happens. A
    write error inside becomes a :class:`VqkitError` naming the file."""
    if out.exists() and not out.is_dir():
        raise VqkitError(f"{out} exists and is not a folder")
    if out.is_dir() and not (out / CONFIG).exists() and any(_visible(out)):
        raise VqkitError(f"{out} is not empty and not a feature cache; choose a new folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / ".lock", "w")  # noqa: SIM115 (closed by the with below)
    except OSError as e:
        raise VqkitError(f"cannot write the feature cache {out}: {e.strerror or e}") from None
    with lock:
        try:
            fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # the lock file is removed on the way out: one already removed is no lock at all
            if os.fstat(lock.fileno()).st_ino != (out / ".lock").stat().st_ino:
                raise OSError
        except OSError:
            raise VqkitError(f"another vqkit prepare is writing {out}") from None
        try:
            yield
        except OSError as e:  # the manifest's appends (atomic writes say so themselves)
            raise VqkitError(f"cannot write {e.filename or out}: {e.strerror or e}") from None
        finally:
            (out / ".lock").unlink(missing_ok=True)


def _visible(folder: Path) -> Iterator[Path]:
    return (p for p in folder.iterdir() if p.name != ".lock")


def write_config(out: Path, config: Config) -> None:
    """Write ``config.json``, or check that an earlier run used the same settings."""
    new = config_to_dict(config)
    if not (out / CONFIG).exists():
        write_json(out / CONFIG, {"format_version": FORMAT_VERSION, **new})
        return
    old = read_json(out / CONFIG)
    if not isinstance(old, dict) or old.get("format_version") != FORMAT_VERSION:
        raise VqkitError(f"{out} was made by another vqkit version; prepare into a new folder")
    for section in PREPARED_SECTIONS:
        for key, value in new[section].items():
            before = old.get(section, {}).get(key, SAVED_BEFORE.get((section, key)))
            if before != value:
                raise VqkitError(
                    f"{out} was prepared with {section}.{key}={shown(repr(before))}, now "
                    f"{shown(repr(value))}; "
                    "prepare into a new folder (or delete it)"
                )


def shard_name(paths: list[str]) -> str:
    """``features/shard-HASH.npy``, named by the corpus paths it holds: a rerun that redoes a
    chunk rewrites the same name, and never one that rows of earlier runs point into."""
    digest = hashlib.sha256("\n".join(paths).encode()).hexdigest()[:20]
    return f"{FEATURES}/shard-{digest}.npy"


def remove_unused_shards(out: Path, rows: list[dict]) -> None:
    """Delete shards no row points into (left by killed runs)."""
    used = {row["features"] for row in rows}
    for shard in (out / FEATURES).glob("shard-*.npy"):
        if f"{FEATURES}/{shard.name}" not in used:
            shard.unlink(missing_ok=True)
