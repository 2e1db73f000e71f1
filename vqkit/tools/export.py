"""``vqkit export``: a trained model as two standalone modules, TorchScript or ONNX.

- the encoder with its quantizer: normalised features ``x`` ``(B, F, N)`` (or images
  ``(B, C, H, W)``) -> ``codes`` ``(B, Q, N')`` int64 (a continuous model gives its latent
  ``(B, D, N')``, the VAE its posterior mean); a residual VQ is searched greedily, stage by
  stage (``codec.beam = 1``);
- the decoder: ``codes`` -> ``x_hat`` ``(B, F, N' * downsample)``; crop it to ``N`` frames.

They give the codes and outputs of :meth:`Autoencoder.encode` and :meth:`Autoencoder.decode`
(``tests/test_teaching.py`` checks it). The conv stacks are traced (they have no shape logic); the
padding and the stage loop are written out here in plain tensor code around the bottleneck's own
search and lookup functions (``nearest_rows`` of :mod:`vqkit.nn.codebook`, ``fsq_bound``,
``fsq_codes`` and ``fsq_digits`` of :mod:`vqkit.nn.bottleneck`), so that TorchScript can script
them and ``torch.export`` can trace them with a symbolic batch size and length. ``export.json``
beside the modules records the front end, the normaliser's statistics and the shapes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vqkit.checkpoint import load_checkpoint
from vqkit.config import config_to_dict
from vqkit.errors import VqkitError
from vqkit.files import atomic_path, check_output, write_json
from vqkit.nn.blocks import pad_to_multiple
from vqkit.nn.bottleneck import (
    FSQ,
    Gaussian,
    Identity,
    ResidualVQ,
    VectorQuantizer,
    fsq_bound,
    fsq_codes,
    fsq_digits,
)
from vqkit.nn.codebook import nearest_rows
from vqkit.nn.model import Autoencoder
from vqkit.run import resolve_model

FORMATS = ("torchscript", "onnx")
SUFFIXES = {"torchscript": ".pt", "onnx": ".onnx"}
ONNX_OPSET = 18


class _Stage(nn.Module):
    """One VQ codebook: rows ``(M, D) -> codes (M,)`` and back, as ``VectorQuantizer`` does."""

    def __init__(self, vq: VectorQuantizer) -> None:
        super().__init__()
        self.project_in, self.project_out = vq.project_in, vq.project_out
        self.register_buffer("vectors", vq.codebook.vectors.detach().clone())
        self.l2_normalize = bool(vq.options.l2_normalize)

    def codes(self, rows: Tensor) -> Tensor:
        e = self.project_in(rows)
        if self.l2_normalize:
            e = F.normalize(e, dim=1)
        return nearest_rows(e, self.vectors)

    def decode(self, codes: Tensor) -> Tensor:
        return self.project_out(F.embedding(codes, self.vectors))


class _Codebooks(nn.Module):
    """VQ or residual VQ: latent ``(B, D, *S)`` <-> codes ``(B, Q, *S)``."""

    def __init__(self, stages: list[VectorQuantizer]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(_Stage(stage) for stage in stages)

    def encode(self, z: Tensor) -> Tensor:
        residual = _flatten(z)
        codes: list[Tensor] = []
        for stage in self.stages:
            found = stage.codes(residual)
            codes.append(found)
            residual = residual - stage.decode(found)
        return _unflatten(torch.stack(codes, 1), z)

    def decode(self, codes: Tensor) -> Tensor:
        rows = codes.movedim(1, -1).reshape(-1, codes.shape[1])
        z_q = torch.zeros(0)
        for i, stage in enumerate(self.stages):
            if i < codes.shape[1]:
                z_q_i = stage.decode(rows[:, i])
                z_q = torch.zeros_like(z_q_i) + z_q_i if i == 0 else z_q + z_q_i
        return _unflatten(z_q, codes)


class _Fsq(nn.Module):
    """Finite scalar quantization, as :class:`vqkit.nn.bottleneck.FSQ` (no straight-through)."""

    def __init__(self, fsq: FSQ) -> None:
        super().__init__()
        self.project_in, self.project_out = fsq.project_in, fsq.project_out
        self.register_buffer("levels", fsq.levels.clone())
        self.register_buffer("basis", fsq.basis.clone())

    def encode(self, z: Tensor) -> Tensor:
        digits = fsq_bound(self.project_in(_flatten(z)), self.levels).round()
        return _unflatten(fsq_codes(digits, self.levels, self.basis)[:, None], z)

    def decode(self, codes: Tensor) -> Tensor:
        digits = fsq_digits(codes[:, 0].flatten(), self.levels, self.basis)
        return _unflatten(self.project_out(digits / (self.levels // 2).float()), codes)


class _Continuous(nn.Module):
    """An AE's identity or a VAE's posterior mean; decoding is the identity."""

    def __init__(self, mean: nn.Module) -> None:
        super().__init__()
        self.mean = mean

    def encode(self, z: Tensor) -> Tensor:
        return self.mean(z.movedim(1, -1)).movedim(-1, 1)

    def decode(self, codes: Tensor) -> Tensor:
        return codes


def _flatten(z: Tensor) -> Tensor:
    """``(B, D, *S) -> (B * prod(S), D)``."""
    return z.movedim(1, -1).reshape(-1, z.shape[1])


def _unflatten(rows: Tensor, like: Tensor) -> Tensor:
    """``(B * prod(S), D') -> (B, D', *S)`` for ``like`` of shape ``(B, *, *S)``; contiguous."""
    shape = [like.shape[0]] + list(like.shape[2:]) + [rows.shape[1]]
    return rows.reshape(shape).movedim(-1, 1).contiguous()


def _quantizer(model: Autoencoder) -> nn.Module:
    bottleneck = model.bottleneck
    if isinstance(bottleneck, ResidualVQ):
        return _Codebooks(list(bottleneck.stages))
    if isinstance(bottleneck, VectorQuantizer):
        return _Codebooks([bottleneck])
    if isinstance(bottleneck, FSQ):
        return _Fsq(bottleneck)
    if isinstance(bottleneck, Gaussian):
        return _Continuous(bottleneck.mean)
    if isinstance(bottleneck, Identity):
        return _Continuous(nn.Identity())
    raise VqkitError(f"cannot export a {type(bottleneck).__name__} bottleneck")


class CodesEncoder(nn.Module):
    """``x`` ``(B, F, N)`` or ``(B, C, H, W)`` -> ``codes`` ``(B, Q, *S')`` (or the latent)."""

    def __init__(self, model: Autoencoder, net: nn.Module | None = None) -> None:
        super().__init__()
        self.net = model.encoder if net is None else net
        self.quantizer = _quantizer(model)
        self.multiple, self.dims = int(model.multiple), int(model.dims)

    def forward(self, x: Tensor) -> Tensor:
        pad: list[int] = []
        for i in range(self.dims):  # F.pad lists the last axis first
            size = x.shape[x.dim() - 1 - i]
            pad += [0, (self.multiple - size % self.multiple) % self.multiple]
        return self.quantizer.encode(self.net(F.pad(x, pad)))


class CodesDecoder(nn.Module):
    """``codes`` ``(B, Q, *S')`` (or the latent) -> ``x_hat``, uncropped in time."""

    def __init__(self, model: Autoencoder, net: nn.Module | None = None) -> None:
        super().__init__()
        self.net = model.decoder if net is None else net
        self.quantizer = _quantizer(model)
        crop = model._crop_size(None)  # what decode(codes) crops to with no length given
        self.crop = [-1 if size is None else int(size) for size in crop]

    def forward(self, codes: Tensor) -> Tensor:
        x_hat = self.net(self.quantizer.decode(codes))
        for i, size in enumerate(self.crop):
            if size >= 0:
                x_hat = x_hat.narrow(x_hat.dim() - len(self.crop) + i, 0, size)
        return x_hat


def export_modules(model: Autoencoder) -> tuple[CodesEncoder, CodesDecoder]:
    """The two eager modules that :func:`export_model` saves (eval mode)."""
    model = model.eval()
    return CodesEncoder(model).eval(), CodesDecoder(model).eval()


def torchscript_modules(model: Autoencoder) -> tuple[torch.jit.ScriptModule, ...]:
    """The two modules in TorchScript: the conv stacks traced, the rest scripted."""
    model = model.eval()
    x, codes = example_inputs(model)
    with torch.no_grad():
        x = pad_to_multiple(x, model.multiple, model.dims)
        encoder_net = torch.jit.trace(model.encoder, x)
        decoder_net = torch.jit.trace(model.decoder, model.bottleneck.dequantize(codes))
    return (
        torch.jit.script(CodesEncoder(model, encoder_net).eval()),
        torch.jit.script(CodesDecoder(model, decoder_net).eval()),
    )


@dataclass
class Exported:
    """What :func:`export_model` wrote."""

    encoder: Path
    decoder: Path
    manifest: Path
    format: str


def export_model(
    model: str | os.PathLike, out: str | os.PathLike, format: str = "torchscript"
) -> Exported:
    """Export ``model`` (a run folder or checkpoint) into the folder ``out`` as ``format``."""
    if format not in FORMATS:
        raise VqkitError(f"--format must be one of {', '.join(FORMATS)}, got '{format}'")
    out = Path(out)
    check_output(out, model)
    checkpoint = load_checkpoint(resolve_model(model))
    encoder_path, decoder_path = (out / f"{n}{SUFFIXES[format]}" for n in ("encoder", "decoder"))
    if format == "torchscript":
        for module, path in zip(
            torchscript_modules(checkpoint.model), (encoder_path, decoder_path), strict=True
        ):
            with atomic_path(path) as tmp:
                torch.jit.save(module, str(tmp))
    else:
        save_onnx(checkpoint.model, encoder_path, decoder_path)
    manifest = out / "export.json"
    write_json(manifest, _manifest(checkpoint, format, encoder_path, decoder_path))
    return Exported(encoder_path, decoder_path, manifest, format)


def example_inputs(model: Autoencoder) -> tuple[Tensor, Tensor]:
    """An input ``x`` of batch 2 (four times the padding multiple long, unless the model takes
    one fixed size) and its codes."""
    if model.in_shape is None:
        raise VqkitError("the checkpoint does not record the model's input shape")
    dense = getattr(model.encoder, "dense", False)
    fixed = model.encoder.input_size if dense else None
    if len(model.in_shape) == 3:  # images (C, H, W)
        shape = model.in_shape
    elif fixed is not None:
        shape = (model.in_shape[0], fixed[-1])
    else:
        shape = (model.in_shape[0], 4 * model.multiple)
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return x, model.encode(x)


def save_onnx(model: Autoencoder, encoder_path: Path, decoder_path: Path) -> None:
    """Write both modules as ONNX through ``torch.export``, batch size and length symbolic
    (only the batch for a model of one fixed input size)."""
    try:
        import onnx  # noqa: F401  (torch.onnx needs both to write the file)
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise VqkitError(
            f"ONNX export needs the onnx and onnxscript packages ({e.name} is missing): "
            "pip install onnx onnxscript"
        ) from None
    encoder, decoder = export_modules(model)
    x, codes = example_inputs(model)
    fixed = bool(getattr(model.encoder, "dense", False))
    for module, example, names, path in (
        (encoder, x, ["x", "codes"], encoder_path),
        (decoder, codes, ["codes", "x_hat"], decoder_path),
    ):
        dims = {0: torch.export.Dim.AUTO}
        for axis in range(2, example.dim()) if not fixed else ():
            dims[axis] = torch.export.Dim.AUTO
        with torch.no_grad(), _quiet_exporter():
            program = torch.onnx.export(
                module,
                (example,),
                input_names=names[:1],
                output_names=names[1:],
                dynamic_shapes=(dims,),
                opset_version=ONNX_OPSET,
                dynamo=True,
                verbose=False,
            )
        with atomic_path(path) as tmp:
            program.save(str(tmp), external_data=False)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence, for one export, torch.onnx's log line per optional package it lacks
    (torchvision) and torch.export's deprecation warnings: none concerns the user."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        logger.setLevel(level)


def _manifest(
    checkpoint: Any, format: str, encoder_path: Path, decoder_path: Path
) -> dict[str, Any]:
    model = checkpoint.model
    bottleneck = model.bottleneck
    stats = checkpoint.model.normaliser.meanstd
    norm = {"mean": stats.mean.tolist(), "std": stats.std.tolist()} if stats is not None else {}
    return {
        "format": format,
        "encoder": encoder_path.name,
        "decoder": decoder_path.name,
        "model_id": checkpoint.model_id,
        "in_shape": list(model.in_shape or ()),
        "multiple": model.multiple,
        "downsample": model.downsample,
        "discrete": bottleneck.discrete,
        "n_codebooks": bottleneck.n_codebooks,
        "codebook_size": bottleneck.codebook_size,
        "encoder_io": "x (B, F, N) normalised features -> codes (B, Q, ceil(N / downsample))",
        "decoder_io": "codes (B, Q, N') -> x_hat (B, F, N' * downsample): crop to N frames",
        "normaliser": norm,
        "config": config_to_dict(checkpoint.config),
    }
