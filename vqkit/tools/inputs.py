"""A trained spectrogram model with its front end and normaliser, and the inputs it takes.

The teaching tools (``vqkit pager``, ``vqkit generate``) take an utterance either as an audio file
or as a row of a feature cache, written ``CACHE#KEY`` (or ``CACHE/manifest.jsonl#KEY``), where
``KEY`` is the row's 0-based index in ``manifest.jsonl`` or its ``path`` column, e.g.
``cache/fsdd#3`` or ``cache/fsdd#0_george_0.wav``. A cache row gives the exact features the model
was trained on; an audio file is read at the model's sample rate and analysed by its front end.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from vqkit.audio.frontends import make_frontend
from vqkit.audio.io import read_audio
from vqkit.audio.stft import Frontend
from vqkit.checkpoint import Checkpoint, load_checkpoint
from vqkit.config import Config
from vqkit.data.cache import MANIFEST, FeatureCache, read_manifest
from vqkit.data.dataset import item_side_info
from vqkit.errors import VqkitError, shown
from vqkit.nn.model import Autoencoder
from vqkit.nn.normalise import Normaliser
from vqkit.run import resolve_model


@dataclass
class SpectrogramModel:
    """A checkpoint of a model on spectrogram features, with what it needs around it."""

    checkpoint: Checkpoint
    frontend: Frontend
    normaliser: Normaliser
    name: str  # the run or checkpoint it was loaded from

    @property
    def config(self) -> Config:
        return self.checkpoint.config

    @property
    def model(self) -> Autoencoder:
        return self.checkpoint.model


@dataclass
class ToolInput:
    """One input of a teaching tool (an audio file or a cache row, not a corpus file like
    :class:`vqkit.data.corpora.Utterance`): raw features in dB ``(F, N)`` and the normaliser's
    side info ``(n_side,)``."""

    name: str
    x_db: Tensor
    side: Tensor


def load_spectrogram_model(model: str | os.PathLike) -> SpectrogramModel:
    """Load a run folder or checkpoint whose model works on spectrograms of any length."""
    checkpoint = load_checkpoint(resolve_model(model))
    config = checkpoint.config
    if config.features.kind == "image":
        raise VqkitError(f"{model} is an image model; this tool needs a spectrogram model")
    if getattr(checkpoint.model.encoder, "dense", False):
        raise VqkitError(f"{model} takes only inputs of one fixed size (model.dense_dim > 0)")
    frontend = make_frontend(config.features, config.audio.sample_rate)
    return SpectrogramModel(checkpoint, frontend, checkpoint.model.normaliser, str(model))


def parse_cache_ref(text: str) -> tuple[Path, str] | None:
    """``CACHE#KEY`` or ``CACHE/manifest.jsonl#KEY`` as ``(cache folder, key)``; None when ``text``
    names a file or has no ``#``."""
    if Path(text).is_file() or "#" not in text:
        return None
    root, _, key = text.rpartition("#")
    path = Path(root)
    if path.name == MANIFEST:
        path = path.parent
    if not key:
        raise VqkitError(f"'{text}': say which row after '#' (its index or path)")
    return path, key


def read_input(text: str | os.PathLike, spec: SpectrogramModel) -> ToolInput:
    """The utterance ``text`` names (an audio file or ``CACHE#KEY``), analysed for ``spec``."""
    ref = parse_cache_ref(str(text))
    if ref is not None:
        return read_cache_row(*ref, spec)
    wave, _ = read_audio(text, spec.config.audio.sample_rate)
    with torch.no_grad():
        x_db = spec.frontend(torch.from_numpy(wave))
    return ToolInput(Path(text).name, x_db[0], spec.normaliser.side_info(x_db)[0])


def read_cache_row(root: Path, key: str, spec: SpectrogramModel) -> ToolInput:
    """Row ``key`` (0-based index or ``path``) of the feature cache ``root``."""
    cache = open_cache(root, spec)
    return row_utterance(cache, find_row(read_manifest(root / MANIFEST), key, root), spec)


def row_utterance(cache: FeatureCache, row: dict, spec: SpectrogramModel) -> ToolInput:
    """The utterance of one manifest row of ``cache``."""
    x_db = torch.from_numpy(cache.load(row))
    return ToolInput(row["path"], x_db, item_side_info(spec.normaliser, row))


def open_cache(root: str | os.PathLike, spec: SpectrogramModel) -> FeatureCache:
    """The feature cache ``root``, checked to hold the features ``spec``'s model takes."""
    cache = FeatureCache(root)
    made, wanted = cache.config, spec.config
    if made.features != wanted.features or made.audio.sample_rate != wanted.audio.sample_rate:
        raise VqkitError(
            f"{root} holds other features than {spec.name} takes (compare features.* and "
            "audio.sample_rate in their config.json)"
        )
    return cache


def find_row(rows: list[dict], key: str, root: Path) -> dict:
    """The row whose 0-based index or ``path`` is ``key``."""
    if key.isdigit():
        if int(key) >= len(rows):
            raise VqkitError(f"{root} has {len(rows)} rows; row {shown(key)} does not exist")
        return rows[int(key)]
    for row in rows:
        if row["path"] == key:
            return row
    examples = ", ".join(shown(row["path"]) for row in rows[:3])
    raise VqkitError(
        f"{root} has no row with path '{shown(key)}' (e.g. {examples}; or give an index)"
    )
