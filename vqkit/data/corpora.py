"""Speech corpus layouts: find the utterances under a root, keep a subset, split them.

Layouts (``data.layout``):

- ``folder``: every audio file below the root, recursively (any format libsndfile reads); the
  speaker is the top-level folder name (none for files directly in the root).
- ``fsdd``: Free Spoken Digit Dataset, ``{digit}_{speaker}_{index}.wav`` (in the root or its
  ``recordings/``); label = digit; official split: index 0-4 test, the rest train.
- ``l2arctic``: ``SPEAKER/wav/*.wav``.
- ``speechcommands``: ``LABEL/*.wav`` with ``validation_list.txt`` and ``testing_list.txt``;
  speaker = the file name before ``_nohash_``; ``_background_noise_`` is not a label.
- ``ljspeech``: ``metadata.csv`` (``id|text|normalised text``) and ``wavs/ID.wav``; speaker "LJ".
- ``auto``: the first of ljspeech, speechcommands, l2arctic, fsdd whose marks are present, then
  the image layouts (:func:`detect_image_layout`), else folder.

The image layouts (``cifar10``, ``mnist-idx``, ``image-folder``, ``sklearn-digits``) are read by
:mod:`vqkit.data.images`, which reuses the subset and split rules below.

Splits are deterministic: the official ones where a corpus has them (FSDD's val is then taken from
its train by hash), otherwise a SHA-256 hash of ``(data.seed, path)`` against ``val_fraction`` and
``test_fraction``. ``data.speaker_disjoint`` splits whole speakers (hash-ordered) instead, except
for Speech Commands, whose official lists are already speaker-disjoint.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import soundfile as sf

from vqkit.config import DataConfig, ImageLayout, Layout, choices
from vqkit.errors import VqkitError, shown

IMAGE_LAYOUTS = choices(ImageLayout)
LAYOUTS = choices(Layout)
SPLITS = ("train", "val", "test")
# Every format libsndfile reads, by its name, plus the usual other spellings of their suffixes.
AUDIO_SUFFIXES = frozenset(
    {f".{name.lower()}" for name in sf.available_formats()} - {".raw"}
    | {".aif", ".aifc", ".oga", ".opus", ".snd", ".sph", ".wave", ".mat"}
)
FSDD_NAME = re.compile(r"^(\d)_([A-Za-z]+)_(\d+)\.wav$")
FSDD_TEST_INDICES = 5  # official FSDD test set: indices 0-4
SC_BACKGROUND = "_background_noise_"
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
CIFAR_FOLDER = "cifar-10-batches-py"  # the folder inside cifar-10-python.tar.gz


@dataclass(frozen=True)
class Utterance:
    """One file of a corpus. ``path`` is POSIX and relative to the corpus root."""

    path: str
    speaker: str | None = None
    label: str | None = None
    split: str | None = None  # official split, or None until :func:`assign_splits`
    text: str | None = None


def list_corpus(root: str | Path, data: DataConfig) -> tuple[str, list[Utterance]]:
    """Find, filter and split the utterances under ``root``; returns ``(layout, utterances)``
    with the layout that ``auto`` resolved to and every utterance's split set, sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise VqkitError(f"{root} is not a folder")
    if data.layout not in LAYOUTS:
        raise VqkitError(f"unknown data.layout {data.layout!r}; use one of {', '.join(LAYOUTS)}")
    layout = detect_layout(root) if data.layout == "auto" else data.layout
    if layout in IMAGE_LAYOUTS:
        raise VqkitError(f"{root} holds images (layout '{layout}'): read it with vqkit.data.images")
    utterances = sorted(LISTERS[layout](root), key=lambda u: u.path)
    if not utterances:
        raise VqkitError(f"no audio files found in {root} for layout '{layout}'")
    utterances = select(utterances, data)
    return layout, assign_splits(utterances, data, official=layout in ("fsdd", "speechcommands"))


def inside_root(root: Path, rel: str) -> Path:
    """``root / rel``, refused with a :class:`VqkitError` when a symbolic link (the file or a
    folder on the way) leads out of ``root``: a corpus is what lies inside its root, so a link
    to ``/etc/passwd`` is never opened. Links inside the root are followed."""
    path = root / rel
    try:
        leads_out = not path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):  # a link loop: the reader says it cannot open it
        return path
    if leads_out:
        raise VqkitError(f"{path}: a symbolic link out of the corpus root; not followed")
    return path


def detect_layout(root: Path) -> str:
    """The layout whose marks ``root`` has (see the module docstring)."""
    if (root / "metadata.csv").is_file() and (root / "wavs").is_dir():
        return "ljspeech"
    if any((root / name).exists() for name in (SC_BACKGROUND, "validation_list.txt")):
        return "speechcommands"
    if any(d.is_dir() and any((d / "wav").glob("*.wav")) for d in _subdirs(root)):
        return "l2arctic"
    names = [p.name for p in _fsdd_dir(root).glob("*.wav")]
    if names and all(FSDD_NAME.match(n) for n in names):
        return "fsdd"
    return detect_image_layout(root) or "folder"


def detect_image_layout(root: Path) -> str | None:
    """``cifar10`` (``data_batch_1`` or ``test_batch`` in ``root`` or its ``cifar-10-batches-py``),
    ``mnist-idx`` (``*idx3-ubyte[.gz]`` files), ``image-folder`` (image files and no audio below
    ``root``), or None."""
    for folder in (root, root / CIFAR_FOLDER):
        if any((folder / name).is_file() for name in ("data_batch_1", "test_batch")):
            return "cifar10"
    if any(root.glob("*idx3-ubyte")) or any(root.glob("*idx3-ubyte.gz")):
        return "mnist-idx"
    suffixes = {p.suffix.lower() for p in root.rglob("*") if not p.name.startswith(".")}
    if suffixes & IMAGE_SUFFIXES and not suffixes & AUDIO_SUFFIXES:
        return "image-folder"
    return None


def _subdirs(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _list_folder(root: Path) -> list[Utterance]:
    out = []
    for path in root.rglob("*"):
        parts = path.relative_to(root).parts
        if path.suffix.lower() not in AUDIO_SUFFIXES or any(p.startswith(".") for p in parts):
            continue
        if path.is_file():
            out.append(Utterance(_rel(path, root), speaker=parts[0] if len(parts) > 1 else None))
    return out


def _fsdd_dir(root: Path) -> Path:
    return root / "recordings" if (root / "recordings").is_dir() else root


def _list_fsdd(root: Path) -> list[Utterance]:
    out = []
    for path in _fsdd_dir(root).glob("*.wav"):
        match = FSDD_NAME.match(path.name)
        if match:
            digit, speaker, index = match.groups()
            split = "test" if int(index) < FSDD_TEST_INDICES else "train"
            out.append(Utterance(_rel(path, root), speaker, digit, split))
    return out


def _list_l2arctic(root: Path) -> list[Utterance]:
    return [
        Utterance(_rel(path, root), speaker=d.name)
        for d in _subdirs(root)
        for path in (d / "wav").glob("*.wav")
    ]


def _list_speechcommands(root: Path) -> list[Utterance]:
    official = {}
    for split, name in (("val", "validation_list.txt"), ("test", "testing_list.txt")):
        if (root / name).is_file():
            lines = (root / name).read_text(encoding="utf-8").split()
            official.update({line.strip(): split for line in lines})
    out = []
    for d in _subdirs(root):
        if d.name.startswith("_"):  # _background_noise_ holds noise, not a word
            continue
        for path in d.glob("*.wav"):
            rel = _rel(path, root)
            speaker = path.stem.split("_nohash_")[0]
            split = official.get(rel, "train") if official else None
            out.append(Utterance(rel, speaker, d.name, split))
    return out


def _list_ljspeech(root: Path) -> list[Utterance]:
    out = []
    metadata = root / "metadata.csv"
    for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), 1):
        fields = line.split("|")
        if len(fields) >= 2 and fields[0].strip():
            name = fields[0].strip()
            if "/" in name or "\\" in name or name.startswith("."):  # must stay inside wavs/
                raise VqkitError(
                    f"{metadata}:{number}: id {shown(repr(name))} is not a plain file name"
                )
            text = fields[2] if len(fields) > 2 else fields[1]
            out.append(Utterance(f"wavs/{name}.wav", "LJ", None, None, text))
    return out


LISTERS = {
    "folder": _list_folder,
    "fsdd": _list_fsdd,
    "l2arctic": _list_l2arctic,
    "speechcommands": _list_speechcommands,
    "ljspeech": _list_ljspeech,
}


def select(utterances: list[Utterance], data: DataConfig) -> list[Utterance]:
    """Keep ``data.speakers`` and ``data.labels`` (when given) and at most ``max_per_speaker``
    utterances of each speaker (a hash-ordered, hence deterministic, choice)."""
    for key, wanted in (("speaker", data.speakers), ("label", data.labels)):
        if not wanted:
            continue
        present = {getattr(u, key) for u in utterances} - {None}
        missing = sorted(set(wanted) - present)
        if missing:
            listed = shown(", ".join(sorted(present)[:20]) or "none", limit=200)
            raise VqkitError(
                f"{key} {shown(repr(missing[0]))} not found in the corpus; present: {listed}"
            )
        utterances = [u for u in utterances if getattr(u, key) in wanted]
    if data.max_per_speaker > 0:
        counts: Counter[str | None] = Counter()
        kept = []
        for u in sorted(utterances, key=lambda u: _unit_hash(data.seed, "pick", u.path)):
            counts[u.speaker] += 1
            if counts[u.speaker] <= data.max_per_speaker:
                kept.append(u)
        utterances = sorted(kept, key=lambda u: u.path)
    return utterances


def assign_splits(utterances: list[Utterance], data: DataConfig, official: bool) -> list[Utterance]:
    """Give every utterance a split (see the module docstring)."""
    val, test = data.val_fraction, data.test_fraction
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise VqkitError(
            f"data.val_fraction={val} and data.test_fraction={test} must be >= 0 and sum below 1"
        )
    has_lists = any(u.split in ("val", "test") for u in utterances)
    if data.speaker_disjoint and not (official and has_lists and _disjoint(utterances)):
        by_speaker = _speaker_splits(utterances, data)
        return [replace(u, split=by_speaker[u.speaker]) for u in utterances]
    carve_val = not any(u.split == "val" for u in utterances)  # FSDD: val comes out of train
    return [replace(u, split=_split(u, data, carve_val)) for u in utterances]


def _split(u: Utterance, data: DataConfig, carve_val: bool) -> str:
    h = _unit_hash(data.seed, "split", u.path)
    if u.split in ("val", "test"):
        return u.split
    if u.split == "train":
        return "val" if carve_val and h < data.val_fraction else "train"
    if h < data.test_fraction:
        return "test"
    return "val" if h < data.test_fraction + data.val_fraction else "train"


def _disjoint(utterances: list[Utterance]) -> bool:
    splits: dict[str | None, set[str | None]] = {}
    for u in utterances:
        splits.setdefault(u.speaker, set()).add(u.split)
    return all(len(s) == 1 for s in splits.values())


def _speaker_splits(utterances: list[Utterance], data: DataConfig) -> dict[str | None, str]:
    speakers = sorted({u.speaker for u in utterances} - {None})
    if len(speakers) < len({u.speaker for u in utterances}):
        raise VqkitError(
            "data.speaker_disjoint needs a speaker for every file (folder layout: one top-level "
            "folder per speaker)"
        )
    n_test = max(1, round(data.test_fraction * len(speakers))) if data.test_fraction else 0
    n_val = max(1, round(data.val_fraction * len(speakers))) if data.val_fraction else 0
    if len(speakers) - n_test - n_val < 1:
        raise VqkitError(
            f"data.speaker_disjoint needs at least {n_test + n_val + 1} speakers, "
            f"found {len(speakers)}"
        )
    ordered = sorted(speakers, key=lambda s: _unit_hash(data.seed, "speaker", s))
    splits = ["test"] * n_test + ["val"] * n_val
    return {s: splits[i] if i < len(splits) else "train" for i, s in enumerate(ordered)}


def _unit_hash(seed: int, purpose: str, key: str) -> float:
    """A stable pseudo-random number in [0, 1) for ``key`` (SHA-256, not Python's ``hash``)."""
    digest = hashlib.sha256(f"{seed}:{purpose}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64
