"""The run folder: where ``vqkit train`` keeps a model and its history, and how a model name
(a shipped model's name, a run folder or a checkpoint file) is resolved.

Two models are shipped: ``default`` (16 kHz, wideband) and ``narrowband`` (8 kHz, every bit below
4 kHz). Asked for ``default``, encoding takes ``narrowband`` for input at 8 kHz or below
(:func:`model_for_rate`), and decoding takes whichever shipped model made the codes
(:func:`model_for_codes`), so a user never names the narrowband model to use it.

A run folder holds ``config.json`` (the resolved config), ``metrics.jsonl`` (one JSON row per
logged step), ``loss.png`` and ``checkpoints/{last,best}.safetensors``.
"""

from __future__ import annotations

import functools
import importlib.resources
import os
from dataclasses import dataclass
from pathlib import Path

from vqkit.checkpoint import load_checkpoint
from vqkit.errors import VqkitError
from vqkit.files import check_readable

CHECKPOINT_NAMES = ("best", "last")  # the one a run folder stands for first
SHIPPED = ("default", "narrowband")  # models in vqkit/assets, by name
NARROWBAND_RATE = 8000  # Hz: "default" codes input at or below this with "narrowband"


@dataclass(frozen=True)
class RunFolder:
    """The paths inside one run folder ``root``."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def loss_plot(self) -> Path:
        return self.root / "loss.png"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, name: str) -> Path:
        """``checkpoints/NAME.safetensors`` (``name`` is "best" or "last")."""
        return self.checkpoints / f"{name}.safetensors"

    @classmethod
    def of(cls, model: str | os.PathLike, checkpoint: Path) -> RunFolder | None:
        """The run folder that ``model`` names, or that holds its resolved ``checkpoint``; None
        when neither is a run folder (the shipped model, a loose checkpoint file)."""
        for candidate in (Path(model), checkpoint.parent.parent):
            if candidate.is_dir() and cls(candidate).metrics.is_file():
                return cls(candidate)
        return None


def shipped_model(name: str) -> Path | None:
    """The file of the shipped model ``name`` (one of :data:`SHIPPED`), None if not installed."""
    path = Path(str(importlib.resources.files("vqkit") / "assets" / f"{name}.safetensors"))
    return path if path.is_file() else None


def model_for_rate(model: str | os.PathLike, sample_rate: int) -> str | os.PathLike:
    """The model that codes input at ``sample_rate`` when ``model`` is asked for: the shipped
    narrowband model for ``"default"`` at or below :data:`NARROWBAND_RATE`, else ``model``."""
    narrow = sample_rate <= NARROWBAND_RATE and shipped_model("narrowband") is not None
    return "narrowband" if os.fspath(model) == "default" and narrow else model


def model_for_codes(model: str | os.PathLike, model_id: str) -> str | os.PathLike:
    """The model that decodes codes of ``model_id`` when ``model`` is asked for: for
    ``"default"``, the shipped model that made them (``"default"`` when none did, whose
    mismatch the decoder then reports), else ``model``."""
    if os.fspath(model) != "default":
        return model
    made = [name for name in SHIPPED if _shipped_id(name) == model_id]
    return made[0] if made else model


@functools.cache
def _shipped_id(name: str) -> str | None:
    path = shipped_model(name)
    return None if path is None else load_checkpoint(path).model_id


def resolve_model(name: str | os.PathLike) -> Path:
    """Map a shipped model's name, a run folder or a file path to a checkpoint file that
    exists."""
    if os.fspath(name) in SHIPPED:
        path = shipped_model(os.fspath(name))
        if path is None:
            raise VqkitError(
                f"this vqkit ships no {os.fspath(name)} model; pass --model RUN or a checkpoint"
            )
        return path
    path = Path(name)
    if path.is_dir():
        run = RunFolder(path)
        for candidate in CHECKPOINT_NAMES:
            if run.checkpoint(candidate).is_file():
                return run.checkpoint(candidate)
        raise VqkitError(f"{path} is a folder without checkpoints/best.safetensors (not a run?)")
    if not path.exists():
        raise VqkitError(f"model {path} does not exist (expected 'default', a run or a checkpoint)")
    return check_readable(path, "a checkpoint")  # not a pipe, which loading would block on
