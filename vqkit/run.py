"""The run folder: where ``vqkit train`` keeps a model and its history, and how a model name
("default", a run folder or a checkpoint file) is resolved.

A run folder holds ``config.json`` (the resolved config), ``metrics.jsonl`` (one JSON row per
logged step), ``loss.png`` and ``checkpoints/{last,best}.safetensors``.
"""

from __future__ import annotations

import importlib.resources
import os
from dataclasses import dataclass
from pathlib import Path

from vqkit.errors import VqkitError
from vqkit.files import check_readable

CHECKPOINT_NAMES = ("best", "last")  # the one a run folder stands for first


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


def resolve_model(name: str | os.PathLike) -> Path:
    """Map ``"default"``, a run folder or a file path to a checkpoint file that exists."""
    if str(name) == "default":
        path = Path(str(importlib.resources.files("vqkit") / "assets" / "default.safetensors"))
        if not path.is_file():
            raise VqkitError("this vqkit ships no default model; pass --model RUN or a checkpoint")
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
