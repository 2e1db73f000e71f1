"""Image corpora: the image layouts of ``vqkit prepare`` and their readers.

Layouts (``data.layout``; ``auto`` finds the first three by their marks):

- ``cifar10``: the python batches ``data_batch_1..5`` (train) and ``test_batch`` (test), in the
  root or its ``cifar-10-batches-py/``; 32x32 RGB. Read by a restricted unpickler
  (:func:`read_cifar_batch`), never by plain :func:`pickle.load`.
- ``mnist-idx``: MNIST-style idx files ``train-images-idx3-ubyte`` (train) and
  ``t10k-images-idx3-ubyte`` (test), gzipped or not, labels from the matching ``idx1`` files when
  present. Debian's ``dataset-fashion-mnist`` puts Fashion-MNIST in
  ``/usr/share/datasets/fashion-mnist``.
- ``image-folder``: every PNG / JPEG (anything Pillow reads, by suffix) below the root; the label
  is the first sub-folder, and top-level ``train/``, ``val/``, ``test/`` folders give the split.
  Grey when every image is, else RGB; images of another size than the most common one are
  reported as failed.
- ``sklearn-digits``: scikit-learn's bundled 1,797 8x8 digits (no download; SRC is not read, and
  ``auto`` takes the name ``sklearn-digits`` when no such path exists). It has no official split.

Splits follow :mod:`vqkit.data.corpora`: the official train/test split where a layout has one, with
val
taken out of train by a hash of ``(data.seed, path)``; otherwise hashed test, val and train.

:mod:`vqkit.data.image_prepare` writes them into a feature cache.
"""

from __future__ import annotations

import gzip
import math
import pickle
import struct
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vqkit.data.corpora import (
    CIFAR_FOLDER,
    IMAGE_LAYOUTS,
    IMAGE_SUFFIXES,
    Utterance,
    detect_layout,
    inside_root,
)
from vqkit.errors import VqkitError

try:  # numpy >= 2 moved it; CIFAR-10's own pickles name numpy.core.multiarray
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover
    from numpy.core.multiarray import _reconstruct

CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = "test_batch"
CIFAR_SHAPE = (3, 32, 32)
IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
SPLIT_FOLDERS = {"train": "train", "training": "train", "val": "val", "valid": "val"}
SPLIT_FOLDERS |= {"validation": "val", "test": "test", "testing": "test"}
GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})


@dataclass
class ImageCorpus:
    """The images of a corpus: one :class:`Utterance` per image (``split`` the official one or
    None) and ``read(path)``, which gives its ``(C, H, W)`` uint8 (0..255) or float16 (0..1)
    array or raises :class:`VqkitError`."""

    layout: str
    items: list[Utterance]
    read: Callable[[str], np.ndarray]
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def find_image_layout(src: Path, layout: str) -> str | None:
    """The image layout that ``layout`` names or that ``auto`` finds at ``src``; None for audio."""
    if layout in IMAGE_LAYOUTS:
        return layout
    if layout != "auto":
        return None
    if src.name == "sklearn-digits" and not src.exists():
        return "sklearn-digits"
    found = detect_layout(src) if src.is_dir() else None
    return found if found in IMAGE_LAYOUTS else None


def list_images(src: Path, layout: str) -> ImageCorpus:
    """The images of ``src`` in the image ``layout`` (see the module docstring)."""
    if layout not in LISTERS:
        raise VqkitError(f"unknown image layout {layout!r}; use one of {', '.join(IMAGE_LAYOUTS)}")
    if layout != "sklearn-digits" and not src.is_dir():
        raise VqkitError(f"{src} is not a folder")
    corpus = LISTERS[layout](src)
    if not corpus.items:
        raise VqkitError(f"no images found in {src} for layout '{layout}'")
    return corpus


def _from_arrays(
    layout: str, parts: Sequence[tuple[str, np.ndarray, Sequence[int] | None, str | None]]
) -> ImageCorpus:
    """A corpus of in-memory images: ``parts`` are ``(name, images (n, C, H, W), labels or
    None, split or None)``; image ``i`` of part ``name`` has the path ``name/i``."""
    items, where = [], {}
    for name, images, labels, split in parts:
        width = max(5, len(str(len(images) - 1)))
        for i in range(len(images)):
            path = f"{name}/{i:0{width}d}"
            label = None if labels is None else str(int(labels[i]))
            items.append(Utterance(path, label=label, split=split))
            where[path] = (images, i)

    def read(path: str) -> np.ndarray:
        images, i = where[path]
        return images[i]

    return ImageCorpus(layout, items, read)


# ---- CIFAR-10 ----------------------------------------------------------------------------------

# A pickle is a small program: GLOBAL imports any callable and REDUCE calls it, so a crafted file
# can run os.system. CIFAR-10 batches hold a dict of strings, lists of ints and one uint8 array;
# the array alone needs globals, exactly these three. They can only make arrays and dtypes:
# _reconstruct(cls, shape, dtype) makes an empty array of ``cls`` (ndarray is the only class a file
# can name here), ndarray.__setstate__ and dtype.__setstate__ copy bytes into it, and none of them
# imports, opens or evaluates anything. Every other global, including those reached through
# copyreg's extension codes, goes through find_class and is refused; persistent ids are refused by
# the base Unpickler. The worst a crafted batch can do is fail to load or ask for a big allocation.
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays only (see the comment above)."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _PICKLE_GLOBALS.get((module, name))
        if allowed is None:
            raise VqkitError(
                f"refusing to unpickle {module}.{name}: a CIFAR-10 batch needs only numpy arrays "
                "(the file is corrupt or malicious)"
            )
        return allowed


def read_cifar_batch(path: Path) -> tuple[np.ndarray, list[int]]:
    """Images ``(n, 3, 32, 32)`` uint8 and labels of one CIFAR-10 python batch, unpickled with
    nothing but numpy's array globals allowed."""
    try:
        with open(path, "rb") as f:
            # latin1: the batches are Python 2 pickles, and numpy reads their raw bytes so
            batch = _ArrayUnpickler(f, encoding="latin1").load()
    except VqkitError as e:
        raise VqkitError(f"{path}: {e}") from None
    except Exception as e:  # any failure to parse untrusted bytes means a bad file
        raise VqkitError(f"{path} is not a CIFAR-10 python batch ({type(e).__name__})") from None
    data = batch.get("data") if isinstance(batch, dict) else None
    labels = batch.get("labels") if isinstance(batch, dict) else None
    size = math.prod(CIFAR_SHAPE)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape[1:] != (size,):
        raise VqkitError(f"{path}: a CIFAR-10 batch has 'data' of uint8 (n, {size})")
    if not isinstance(labels, list) or len(labels) != len(data):
        raise VqkitError(f"{path}: a CIFAR-10 batch has a list of {len(data)} 'labels'")
    if not all(isinstance(v, int) for v in labels):
        raise VqkitError(f"{path}: CIFAR-10 labels must be integers")
    return data.reshape(-1, *CIFAR_SHAPE), labels


def _list_cifar10(root: Path) -> ImageCorpus:
    folder = CIFAR_FOLDER if (root / CIFAR_FOLDER).is_dir() else "."
    parts = [
        (name, *read_cifar_batch(inside_root(root, f"{folder}/{name}")), split)
        for name, split in [*((n, "train") for n in CIFAR_TRAIN), (CIFAR_TEST, "test")]
        if (root / folder / name).is_file()
    ]
    return _from_arrays("cifar10", parts)


# ---- MNIST idx ---------------------------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """The array in an idx file (MNIST's format: magic ``00 00 TYPE NDIM``, big-endian uint32
    sizes, then the data), gzipped when the name ends in ``.gz``."""
    try:
        with gzip.open(path) if path.suffix == ".gz" else open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise VqkitError(f"{path}: cannot read it ({e})") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in IDX_DTYPES:
        raise VqkitError(f"{path} is not an idx file (bad magic number)")
    header = 4 + 4 * data[3]
    if len(data) < header:
        raise VqkitError(f"{path} is not an idx file (truncated header)")
    shape = struct.unpack(f">{data[3]}I", data[4:header])
    dtype = np.dtype(IDX_DTYPES[data[2]])
    if len(data) - header != math.prod(shape) * dtype.itemsize:
        raise VqkitError(
            f"{path}: its header promises {dtype} {shape} but it holds {len(data) - header} bytes"
        )
    return np.frombuffer(data, dtype, offset=header).reshape(shape)


def _idx_files(root: Path, kind: str) -> dict[str, Path]:
    """``*{kind}-ubyte[.gz]`` files by their name without ``.gz`` (the plain file wins)."""
    found = {p.name.removesuffix(".gz"): p for p in sorted(root.glob(f"*{kind}-ubyte.gz"))}
    return found | {p.name: p for p in sorted(root.glob(f"*{kind}-ubyte"))}


def _list_mnist_idx(root: Path) -> ImageCorpus:
    labels_files = _idx_files(root, "idx1")
    parts = []
    for name, path in sorted(_idx_files(root, "idx3").items()):
        images = read_idx(inside_root(root, path.name))
        if images.dtype != np.uint8:
            raise VqkitError(f"{path}: expected uint8 images (n, H, W), got {images.dtype}")
        labels = None
        label_path = labels_files.get(name.replace("images", "labels").replace("idx3", "idx1"))
        if label_path is not None:
            labels = read_idx(inside_root(root, label_path.name))
            if labels.shape != images.shape[:1]:
                raise VqkitError(f"{label_path} has {labels.shape} labels for {len(images)} images")
        split = "test" if name.startswith(("t10k", "test")) else None
        split = "train" if name.startswith("train") else split
        parts.append((name, images[:, None], labels, split))
    return _from_arrays("mnist-idx", parts)


# ---- image folders ------------------------------------------------------------------------------


def _folder_item(path: str) -> Utterance:
    parts = path.split("/")
    split = SPLIT_FOLDERS.get(parts[0].lower()) if len(parts) > 1 else None
    inner = parts[1:] if split else parts
    return Utterance(path, label=inner[0] if len(inner) > 1 else None, split=split)


def _list_image_folder(root: Path) -> ImageCorpus:
    from PIL import Image

    headers: dict[str, tuple[str, tuple[int, int]]] = {}
    failed = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.suffix.lower() not in IMAGE_SUFFIXES or "/." in f"/{rel}" or not path.is_file():
            continue
        try:
            with Image.open(inside_root(root, rel)) as image:  # reads the header only
                headers[rel] = image.mode, image.size
        except VqkitError as e:
            failed.append((rel, str(e).removeprefix(f"{path}: ")))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            failed.append((rel, f"Pillow cannot read it ({e})"))
    sizes = Counter(size for _, size in headers.values())
    size = sizes.most_common(1)[0][0] if sizes else (0, 0)
    mode = "L" if all(m in GREY_MODES for m, _ in headers.values()) else "RGB"
    items = []
    for rel, (_, got) in headers.items():
        if got == size:
            items.append(_folder_item(rel))
        else:
            reason = f"{got[0]}x{got[1]} pixels, unlike most images ({size[0]}x{size[1]})"
            failed.append((rel, reason))

    def read(rel: str) -> np.ndarray:
        try:
            with Image.open(root / rel) as image:
                x = np.asarray(image.convert(mode), dtype=np.uint8)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise VqkitError(f"Pillow cannot decode it ({e})") from None
        return x[None] if x.ndim == 2 else x.transpose(2, 0, 1)

    return ImageCorpus("image-folder", items, read, failed)


# ---- scikit-learn digits -----------------------------------------------------------------------


def _list_sklearn_digits(root: Path) -> ImageCorpus:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise VqkitError(
            "the sklearn-digits layout needs scikit-learn: pip install scikit-learn"
        ) from None
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float16)[:, None]  # 0..16 -> 0..1, exact
    return _from_arrays("sklearn-digits", [("digits", images, digits.target, None)])


LISTERS: dict[str, Callable[[Path], ImageCorpus]] = {
    "cifar10": _list_cifar10,
    "mnist-idx": _list_mnist_idx,
    "image-folder": _list_image_folder,
    "sklearn-digits": _list_sklearn_digits,
}
