"""Checkpoints: safetensors weights plus the JSON config, written atomically, never unpickled.

A checkpoint file holds
  metadata  {"format": "vqkit-checkpoint", "version": "1", "config": <json>, "meta": <json>}
            and, for a resumable checkpoint, "optimizer" and "scheduler" (JSON without tensors);
  tensors   "model.<name>" (the model's state_dict, its normaliser's statistics included), other
            named tensors, "optimizer.<param>.<key>" (optimizer state). Checkpoints written before
            the normaliser joined the model keep its statistics as "norm.mean" and "norm.std";
            they are read into ``model.normaliser`` (:data:`LEGACY_NORMALISER`).
A compact checkpoint (``save_checkpoint(..., compact=True)``, for shipping) leaves out the
codebooks' training state (:data:`TRAINING_STATE`) and stores the decoder in float16
(:data:`HALF_PRECISION`): the encoder and codebooks keep float32, so the codes do not change.
It loads for inference like any other; training cannot resume from it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from vqkit.config import SAVED_BEFORE, Config, config_to_dict, saved_config_from_dict
from vqkit.errors import VqkitError, shown
from vqkit.files import atomic_path
from vqkit.nn.model import Autoencoder, build_model

FORMAT = "vqkit-checkpoint"
FORMAT_VERSION = 1
MODEL_PREFIX = "model."
OPTIMIZER_PREFIX = "optimizer."
NORMALISER_PREFIX = "normaliser."  # model weights that the model id leaves out (see model_id)
LEGACY_NORMALISER = {"norm.mean": "normaliser.meanstd.mean", "norm.std": "normaliser.meanstd.std"}
# Codebook buffers only training reads (EMA sums, usage for re-seeding dead codes)
TRAINING_STATE = (".codebook.cluster_size", ".codebook.embed_sum", ".codebook.usage")
HALF_PRECISION = ("decoder.",)  # weights after the codes: float16 there changes no code


@dataclass
class Checkpoint:
    """A loaded checkpoint; ``optimizer`` and ``scheduler`` are state dicts or None (not saved)."""

    model: Autoencoder  # in eval mode
    config: Config
    tensors: dict[str, Tensor]  # non-model, non-optimizer tensors
    meta: dict[str, Any]
    model_id: str  # sha256 of weights + config, 16 hex digits
    optimizer: dict[str, Any] | None = field(default=None, repr=False)
    scheduler: dict[str, Any] | None = field(default=None, repr=False)


def save_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    config: Config,
    *,
    tensors: dict[str, Tensor] | None = None,
    meta: dict[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    compact: bool = False,
) -> None:
    """Write ``model`` (and optionally the optimizer and scheduler) to ``path`` atomically;
    ``compact`` for inference only (see the module docstring)."""
    state = model.state_dict()
    if compact:
        state = {k: _compact(k, v) for k, v in state.items() if not k.endswith(TRAINING_STATE)}
    flat = {MODEL_PREFIX + k: v for k, v in state.items()}
    for name, value in (tensors or {}).items():
        if name.startswith((MODEL_PREFIX, OPTIMIZER_PREFIX)):
            raise ValueError(f"tensor name {name!r} uses a reserved prefix")
        flat[name] = value
    metadata = {
        "format": FORMAT,
        "version": str(FORMAT_VERSION),
        "config": json.dumps(config_to_dict(config), sort_keys=True),
        "meta": json.dumps(meta or {}, sort_keys=True),
    }
    if optimizer is not None:
        optim_tensors, metadata["optimizer"] = _flatten_optimizer(optimizer.state_dict())
        flat.update(optim_tensors)
    if scheduler is not None:
        metadata["scheduler"] = json.dumps(scheduler.state_dict())
    # safetensors refuses shared or non-contiguous storage; checkpoints are small, so copy.
    flat = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in flat.items()}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata=metadata)


def load_checkpoint(path: str | os.PathLike, *, map_location: str = "cpu") -> Checkpoint:
    """Load a checkpoint written by :func:`save_checkpoint`; the model is returned in eval mode."""
    path = Path(path)
    metadata, flat = _read_safetensors(path, map_location)
    if metadata.get("format") != FORMAT:
        raise VqkitError(f"{path} is a safetensors file but not a vqkit checkpoint (no format tag)")
    if metadata.get("version") != str(FORMAT_VERSION):
        raise VqkitError(
            f"{path} is vqkit checkpoint version {shown(metadata.get('version'))}; this vqkit "
            f"reads version {FORMAT_VERSION}: retrain or use a matching vqkit"
        )
    try:
        config = saved_config_from_dict(_json_object(metadata.get("config", ""), "config"))
        meta = _json_object(metadata.get("meta", "{}"), "meta")
    except VqkitError as e:
        raise VqkitError(f"{path} has a config this vqkit cannot load: {e}") from None
    weights = {k[len(MODEL_PREFIX) :]: v for k, v in flat.items() if k.startswith(MODEL_PREFIX)}
    if not any(k.startswith(NORMALISER_PREFIX) for k in weights):
        weights |= {new: flat.pop(old) for old, new in LEGACY_NORMALISER.items() if old in flat}
    model = _build_and_fill(path, config, meta, weights)
    _check_tensors(path, flat)
    optimizer, scheduler = None, None
    try:
        if "optimizer" in metadata:
            optim_tensors = {k: v for k, v in flat.items() if k.startswith(OPTIMIZER_PREFIX)}
            optimizer = _unflatten_optimizer(optim_tensors, metadata["optimizer"])
        if "scheduler" in metadata:
            scheduler = _json_object(metadata["scheduler"], "scheduler")
    except (VqkitError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise VqkitError(f"{path} has damaged optimizer or scheduler state ({e})") from None
    return Checkpoint(
        model=model.eval(),
        config=config,
        tensors={
            k: v for k, v in flat.items() if not k.startswith((MODEL_PREFIX, OPTIMIZER_PREFIX))
        },
        meta=meta,
        model_id=model_id(weights, config),
        optimizer=optimizer,
        scheduler=scheduler,
    )


# Keys that only steer the encoder: files record what they hold and a model decodes them all, so
# switching one must not orphan the files already made.
ENCODER_ONLY = (("codec", "side_coding"), ("codec", "beam"), ("features", "pitch"))


def model_id(weights: dict[str, Tensor], config: Config) -> str:
    """A short content hash of the network's weights and the config: 16 hex digits of sha256.

    The normaliser's statistics are left out, as they were when they travelled beside the weights,
    and so are config keys added later (:data:`vqkit.config.SAVED_BEFORE`) at the value configs
    saved before them had, so that the ids of models saved before (the shipped one among them)
    stay what they were; and so are the keys of :data:`ENCODER_ONLY`."""
    values = config_to_dict(config)
    for (section, key), before in SAVED_BEFORE.items():
        if values[section].get(key) == before:
            del values[section][key]
    for section, key in ENCODER_ONLY:
        values[section].pop(key, None)
    digest = hashlib.sha256(json.dumps(values, sort_keys=True).encode())
    for name in sorted(k for k in weights if not k.startswith(NORMALISER_PREFIX)):
        tensor = weights[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _read_safetensors(path: Path, map_location: str) -> tuple[dict[str, str], dict[str, Tensor]]:
    if not path.is_file():
        raise VqkitError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device=map_location) as f:
            metadata = f.metadata() or {}
            flat = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
    except (SafetensorError, OSError, ValueError) as e:
        # Only now look for torch.save's zip archive (PK..) or legacy pickle (0x80, protocol
        # 2-5): the first 8 bytes of a safetensors file are its header size and may look alike.
        with open(path, "rb") as f:
            head = f.read(2)
        if head in (b"PK", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"):
            raise VqkitError(
                f"{path} is a pickled PyTorch file (torch.save); vqkit refuses to unpickle "
                "checkpoints: save it with vqkit (safetensors) instead"
            ) from None
        raise VqkitError(f"{path} is not a safetensors checkpoint ({e})") from None
    return metadata, flat


def _compact(name: str, tensor: Tensor) -> Tensor:
    half = name.startswith(HALF_PRECISION) and tensor.dtype == torch.float32
    return tensor.half() if half else tensor


def _build_and_fill(
    path: Path, config: Config, meta: dict[str, Any], weights: dict[str, Tensor]
) -> Autoencoder:
    in_shape = meta.get("in_shape")
    if not isinstance(in_shape, list) or not all(type(n) is int and n > 0 for n in in_shape):
        raise VqkitError(f"{path} does not record the model's input shape (meta.in_shape)")
    # Check the shapes on the meta device first (no memory), so that a config claiming a huge
    # model fails here instead of allocating it; then build the real model.
    expected = _build(path, config, tuple(in_shape), "meta").state_dict()
    missing = sorted(k for k in expected.keys() - weights.keys() if not k.endswith(TRAINING_STATE))
    unexpected = sorted(weights.keys() - expected.keys())
    reshaped = sorted(
        k for k in expected.keys() & weights.keys() if expected[k].shape != weights[k].shape
    )
    if missing and all(k.startswith(NORMALISER_PREFIX) for k in missing):
        raise VqkitError(f"{path}: the checkpoint lacks the normaliser's mean and std: damaged")
    if missing or unexpected or reshaped:
        example = (missing or unexpected or reshaped)[0]
        raise VqkitError(
            f"{path}: checkpoint from another model: its weights do not fit the model built from "
            f"its config ({len(missing)} missing, {len(unexpected)} unexpected, {len(reshaped)} "
            f"of another shape, e.g. '{shown(example)}')"
        )
    for name, tensor in weights.items():
        if tensor.is_floating_point() != expected[name].is_floating_point():
            raise VqkitError(f"{path}: weight '{name}' has dtype {tensor.dtype}: damaged")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise VqkitError(f"{path}: weight '{name}' holds NaN or Inf (training diverged?)")
    model = _build(path, config, tuple(in_shape), None)
    model.load_state_dict(weights, strict=False)  # all but the training state, checked above
    try:
        model.normaliser.check()
    except ValueError as e:
        raise VqkitError(f"{path}: the normaliser's statistics are damaged ({e})") from None
    return model


def _check_tensors(path: Path, flat: dict[str, Tensor]) -> None:
    """Every floating tensor beside the weights (optimizer state, extra statistics) finite: the
    weights and the normaliser are checked as the model is filled."""
    for name, tensor in flat.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise VqkitError(f"{path}: tensor '{shown(name)}' holds NaN or Inf: damaged")


def _build(
    path: Path, config: Config, in_shape: tuple[int, ...], device: str | None
) -> Autoencoder:
    try:
        with torch.device(device) if device else contextlib.nullcontext():
            return build_model(config, in_shape)
    except (VqkitError, ValueError, RuntimeError, TypeError) as e:
        raise VqkitError(f"{path} has a config this vqkit cannot build a model from: {e}") from None


def _json_object(text: str, name: str) -> dict[str, Any]:
    """Parse JSON text that must hold an object, else :class:`VqkitError`."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise VqkitError(f"{name} is not valid JSON ({type(e).__name__})") from None
    if not isinstance(value, dict):
        raise VqkitError(f"{name} is not a JSON object")
    return value


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, Tensor], str]:
    """Split an optimizer state_dict into tensors and a JSON string with everything else."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, param_state in state["state"].items():
        for key, value in param_state.items():
            if isinstance(value, Tensor):
                tensors[f"{OPTIMIZER_PREFIX}{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    text = json.dumps({"param_groups": state["param_groups"], "scalars": scalars})
    return tensors, text


def _unflatten_optimizer(tensors: dict[str, Tensor], text: str) -> dict[str, Any]:
    """Inverse of :func:`_flatten_optimizer`: an optimizer state_dict ready for load_state_dict."""
    plain = json.loads(text)
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        index, key = name[len(OPTIMIZER_PREFIX) :].split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for index, values in plain["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    groups = plain["param_groups"]
    for group in groups:
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}
