"""Held-out evaluation over a split of a feature cache: reconstruction loss, per-stage code usage
and perplexity, and PSNR (images) or spectral distortion and LSD (audio, in dB on denormalised
features). :func:`evaluate` gives the numbers the trainer logs; :func:`evaluate_run` (``vqkit
evaluate``) scores a trained run on a whole split and draws its pictures.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vqkit.checkpoint import Checkpoint, checkpoint_normaliser, load_checkpoint, resolve_model
from vqkit.config import Config, config_to_dict
from vqkit.data import FeatureCache, SegmentDataset, item_side_info
from vqkit.errors import VqkitError
from vqkit.files import atomic_path, write_json
from vqkit.metrics import LSD_FLOOR_DB, spectral_distortion_db
from vqkit.model import Autoencoder, AutoencoderOutput
from vqkit.runlog import plot_losses, read_metrics

RECON_LOSSES = ("mse", "l1", "l1+mse")


def reconstruction_loss(x_hat: Tensor, x: Tensor, kind: str) -> Tensor:
    """Mean squared and/or absolute error between ``x_hat`` and ``x`` of the same shape."""
    if x_hat.shape != x.shape:
        raise ValueError(f"model output shape {tuple(x_hat.shape)} != input {tuple(x.shape)}")
    if kind == "mse":
        return F.mse_loss(x_hat, x)
    if kind == "l1":
        return F.l1_loss(x_hat, x)
    if kind == "l1+mse":
        return F.l1_loss(x_hat, x) + F.mse_loss(x_hat, x)
    raise VqkitError(f"train.recon_loss must be one of {', '.join(RECON_LOSSES)}, got '{kind}'")


def eval_frames(config: Config) -> int:
    """Evaluate whole items (0), except with a model that only takes fixed-size inputs."""
    fixed = config.model.kind == "convlist" and config.model.dense_dim > 0
    return config.train.segment_frames if fixed else 0


@torch.no_grad()
def evaluate(
    model: Autoencoder,
    dataset: SegmentDataset,
    config: Config,
    device: torch.device,
    n_items: int | None = None,
) -> dict[str, float]:
    """Mean reconstruction loss, bottleneck stats (e.g. "kl"), PSNR (images) or spectral
    distances (audio; :func:`batch_metrics`), and per-stage code usage and perplexity counted over
    the first ``n_items`` items of ``dataset`` (default ``eval_batches * batch_size``).

    Items of equal shape are batched; every number is weighted by frames, so padding never counts.
    """
    model.eval()
    tc = config.train
    n = min(len(dataset), tc.eval_batches * tc.batch_size if n_items is None else n_items)
    totals: dict[str, float] = {}
    counts: Tensor | None = None
    for indices in equal_shape_batches(dataset, n, tc.batch_size):
        x = torch.stack([dataset[i] for i in indices]).to(device)
        out = model(x)
        weight = x.shape[0] * x.shape[-1]
        values = batch_metrics(dataset, indices, x, out, config)
        for key, value in values.items():
            totals[key] = totals.get(key, 0.0) + value * weight
        totals["weight"] = totals.get("weight", 0.0) + weight
        if out.bottleneck.codes is not None:
            batch_counts = code_counts(out.bottleneck.codes, model.bottleneck.codebook_size)
            counts = batch_counts if counts is None else counts + batch_counts
    weight = totals.pop("weight")
    result = {key: value / weight for key, value in totals.items()}
    result["loss"] = result["recon"] + result["aux"]
    if counts is not None:
        result.update(code_stats(counts))
    return result


def equal_shape_batches(dataset: SegmentDataset, n: int, batch_size: int) -> list[list[int]]:
    """The first ``n`` item indices in batches of up to ``batch_size`` items of equal length."""
    by_length: dict[int, list[int]] = {}
    for i in range(n):
        frames = dataset.segment_frames or dataset.items[i]["frames"]
        by_length.setdefault(frames, []).append(i)
    return [
        group[k : k + batch_size]
        for group in by_length.values()
        for k in range(0, len(group), batch_size)
    ]


def batch_metrics(
    dataset: SegmentDataset, indices: list[int], x: Tensor, out: AutoencoderOutput, config: Config
) -> dict[str, float]:
    """The numbers :func:`evaluate` averages for one batch ``x`` of ``dataset[indices]``."""
    values = {"recon": reconstruction_loss(out.x_hat, x, config.train.recon_loss).item()}
    values["aux"] = out.bottleneck.loss.item()
    per_batch = ("usage/", "perplexity/")  # recounted over the whole split
    stats = out.bottleneck.stats.items()
    values.update({k: float(v) for k, v in stats if not k.startswith(per_batch)})
    if config.features.kind == "image":
        values.update(image_errors(x, out.x_hat))
    else:
        values.update(spectral_distances(dataset, indices, x, out.x_hat))
    return values


def image_errors(x: Tensor, x_hat: Tensor) -> dict[str, float]:
    """``mse`` and ``psnr_db`` of images ``(B, C, H, W)`` in [-0.5, 0.5], the reconstruction
    clipped to that range as it would be shown. PSNR is per image (peak-to-peak 1), then averaged.
    """
    err = (x_hat.clamp(-0.5, 0.5) - x).pow(2).flatten(1).mean(1)
    psnr = -10.0 * err.clamp(min=1e-10).log10()
    return {"mse": err.mean().item(), "psnr_db": psnr.mean().item()}


def spectral_distances(
    dataset: SegmentDataset, indices: list[int], x: Tensor, x_hat: Tensor
) -> dict[str, float]:
    """Spectral distortion ``sd_db`` of a batch after undoing the dataset's normalisation, and for
    log-magnitude (``stft``) features ``lsd_db``, the log-spectral distance of
    :func:`vqkit.metrics.log_spectral_distance_db` (magnitude dB are power dB), both spectra
    floored :data:`~vqkit.metrics.LSD_FLOOR_DB` below the reference's loudest bin."""
    normaliser = dataset.normaliser.to(x.device)
    side = torch.stack([item_side_info(normaliser, dataset.items[i]) for i in indices])
    side = side.to(x.device)
    x_db, x_hat_db = normaliser.denormalise(x, side), normaliser.denormalise(x_hat, side)
    values = {"sd_db": spectral_distortion_db(x_db, x_hat_db).mean().item()}
    if dataset.cache.config.features.kind == "stft":
        floor = x_db.amax(dim=(1, 2), keepdim=True) - LSD_FLOOR_DB
        lsd = spectral_distortion_db(x_db.maximum(floor), x_hat_db.maximum(floor))
        values["lsd_db"] = lsd.mean().item()
    return values


def code_counts(codes: Tensor, codebook_size: int) -> Tensor:
    """How often each code of each stage occurs in ``codes`` ``(B, Q, N)``: ``(Q, K)`` counts."""
    per_stage = codes.transpose(0, 1).reshape(codes.shape[1], -1).long()
    return torch.stack([torch.bincount(c, minlength=codebook_size) for c in per_stage]).cpu()


def code_stats(counts: Tensor) -> dict[str, float]:
    """Per stage: the fraction of codes used at least once and the perplexity of their histogram."""
    stats: dict[str, float] = {}
    for q, row in enumerate(counts.double()):
        p = row / row.sum().clamp(min=1)
        entropy = -(p[p > 0] * p[p > 0].log()).sum()
        stats[f"usage/{q}"] = (row > 0).double().mean().item()
        stats[f"perplexity/{q}"] = entropy.exp().item()
    return stats


# ---- vqkit evaluate ------------------------------------------------------------------------------


def evaluate_run(
    run: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    split: str = "test",
    n_grid: int = 16,
    device: str = "cpu",
) -> dict[str, Any]:
    """Score a trained model (a run folder: its best checkpoint; or a checkpoint file) on every
    item of ``split`` of the cache ``data``, with the normaliser it was trained with.

    Writes ``out/metrics.json`` (the numbers of :func:`evaluate`, plus for images the bits per
    image of the codes), ``out/loss.png`` from the run's ``metrics.jsonl`` (when there is one) and
    ``out/grid.png`` (images: ``n_grid`` originals over their reconstructions) or
    ``out/spectrograms.png`` (audio). Returns what ``metrics.json`` holds.
    """
    path = resolve_model(run)
    checkpoint = load_checkpoint(path, map_location=device)
    cache = FeatureCache(data)
    config = checkpoint.config
    check_compatible(checkpoint, cache, path)
    dataset = SegmentDataset(cache, split, eval_frames(config), train=False)
    if len(dataset) == 0:
        raise VqkitError(f"{cache.root} has no '{split}' items to evaluate")
    dataset.normaliser = checkpoint_normaliser(checkpoint)
    model = checkpoint.model.to(device)
    metrics = evaluate(model, dataset, config, torch.device(device), n_items=len(dataset))
    out = Path(out)
    examples = _examples(model, dataset, min(max(n_grid, 1), len(dataset)), device)
    if config.features.kind == "image":
        metrics.update(code_bits(model, tuple(examples[0][0].shape[-2:]), metrics))
    pictures = draw(examples, dataset, out)
    history = (Path(run) if Path(run).is_dir() else path.parent.parent) / "metrics.jsonl"
    if history.is_file():
        plot_losses(read_metrics(history), out / "loss.png")
        pictures.append(out / "loss.png")
    result = {
        "checkpoint": str(path),
        "model_id": checkpoint.model_id,
        "step": checkpoint.meta.get("step"),
        "data": str(cache.root),
        "split": split,
        "n_items": len(dataset),
        "kind": config.features.kind,
        "model": config.model.kind,
        "bottleneck": config.bottleneck.kind,
        "metrics": metrics,
        "pictures": [p.name for p in pictures],
        "out": str(out),
    }
    write_json(out / "metrics.json", result)
    return result


def draw(examples: list[tuple[Tensor, Tensor]], dataset: SegmentDataset, out: Path) -> list[Path]:
    """``out/grid.png`` of image ``examples`` (originals over reconstructions), or
    ``out/spectrograms.png`` of the first two items' features in dB."""
    if dataset.cache.config.features.kind == "image":
        x, x_hat = (torch.cat(v) for v in zip(*examples, strict=True))
        return [plot_image_grid(x, x_hat, out / "grid.png")]
    spectra = [
        tuple(dataset.normaliser.denormalise(v, _side(dataset, [i]))[0] for v in pair)
        for i, pair in enumerate(examples[:2])
    ]
    return [plot_spectrograms(spectra, out / "spectrograms.png")]


def check_compatible(checkpoint: Checkpoint, cache: FeatureCache, path: Path) -> None:
    """Raise :class:`VqkitError` unless ``cache`` holds the features the model was trained on."""
    trained, held = config_to_dict(checkpoint.config), config_to_dict(cache.config)
    image = checkpoint.config.features.kind == "image"
    sections = ("features",) if image else ("audio", "features")
    differ = [
        f"{section}.{key} {trained[section][key]!r} (model) vs {held[section][key]!r} (data)"
        for section in sections
        for key in trained[section]
        if trained[section][key] != held[section][key]
    ]
    if differ:
        raise VqkitError(
            f"{path} was trained on other features than {cache.root} holds: {'; '.join(differ[:3])}"
            "; prepare the data with the run's config"
        )
    rows = cache.items("train") or cache.items("val") or cache.items("test")
    channels = checkpoint.meta["in_shape"][0]
    if image and rows and rows[0]["shape"][0] != channels:
        raise VqkitError(
            f"{path} takes images of {channels} channels; {cache.root} holds {rows[0]['shape'][0]}"
        )


def _side(dataset: SegmentDataset, indices: list[int]) -> Tensor:
    return torch.stack([item_side_info(dataset.normaliser, dataset.items[i]) for i in indices])


@torch.no_grad()
def _examples(
    model: Autoencoder, dataset: SegmentDataset, n: int, device: str
) -> list[tuple[Tensor, Tensor]]:
    """``(x, x_hat)`` of the first ``n`` items, each ``(1, ...)`` on the CPU (items may differ in
    length)."""
    pairs = []
    for i in range(n):
        x = dataset[i][None].to(device)
        pairs.append((x.cpu(), model(x).x_hat.cpu()))
    return pairs


def code_bits(model: Autoencoder, size: tuple[int, int], metrics: dict[str, float]) -> dict:
    """For an image of ``size`` ``(H, W)``: ``latent_positions``, and for discrete codes
    ``bits_per_image`` (positions x stages x log2 codebook_size, as stored) and
    ``entropy_bits_per_image`` (positions x the sum of log2 perplexity over stages: what an
    entropy coder of the code histogram would need)."""
    positions = math.prod(model.latent_shape(size)[1:])
    bottleneck = model.bottleneck
    if not bottleneck.discrete:
        return {"latent_positions": positions, "latent_dim": bottleneck.latent_dim}
    n_codebooks = sum(key.startswith("perplexity/") for key in metrics)
    entropy = sum(math.log2(metrics[f"perplexity/{q}"]) for q in range(n_codebooks))
    return {
        "latent_positions": positions,
        "bits_per_image": positions * n_codebooks * math.log2(bottleneck.codebook_size),
        "entropy_bits_per_image": positions * entropy,
    }


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return path


def mosaic(x: Tensor, columns: int = 8) -> np.ndarray:
    """Tile images ``(B, C, H, W)`` in [-0.5, 0.5] into one ``(rows * (H + 1) - 1, ...)`` array of
    ``(..., 3)`` or grey ``(...)`` values in [0, 1], separated by one-pixel white lines."""
    b, c, h, w = x.shape
    rows = math.ceil(b / columns)
    grid = np.ones((rows * (h + 1) - 1, columns * (w + 1) - 1, c), dtype=np.float32)
    pixels = (x + 0.5).clamp(0.0, 1.0).permute(0, 2, 3, 1).numpy()
    for i in range(b):
        top, left = (i // columns) * (h + 1), (i % columns) * (w + 1)
        grid[top : top + h, left : left + w] = pixels[i]
    return grid[..., 0] if c == 1 else grid


def plot_image_grid(x: Tensor, x_hat: Tensor, path: Path, columns: int = 8) -> Path:
    """Originals ``x`` above their reconstructions ``x_hat`` (both ``(B, C, H, W)``), to a PNG."""
    top, bottom = mosaic(x, columns), mosaic(x_hat, columns)
    inches = 0.55 / (x.shape[-1] + 1)  # per pixel: a tile is about half an inch wide
    figure = _figure(top.shape[1] * inches + 0.2, 2 * top.shape[0] * inches + 0.7)
    for index, (title, image) in enumerate((("original", top), ("reconstruction", bottom)), 1):
        axes = figure.add_subplot(2, 1, index)
        axes.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        axes.set_title(title, fontsize=9)
        axes.axis("off")
    figure.tight_layout(pad=0.3)
    return _save(figure, path)


def plot_spectrograms(spectra: list[tuple[Tensor, Tensor]], path: Path) -> Path:
    """Each item's features ``(F, N)`` in dB (left) beside its reconstruction (right)."""
    figure = _figure(9.0, 2.2 * len(spectra) + 0.4)
    low = min(float(x.min()) for x, _ in spectra)
    high = max(float(x.max()) for x, _ in spectra)
    for i, pair in enumerate(spectra):
        for j, (title, features) in enumerate(
            zip(("original", "reconstruction"), pair, strict=True)
        ):
            axes = figure.add_subplot(len(spectra), 2, 2 * i + j + 1)
            axes.imshow(features.numpy(), origin="lower", aspect="auto", vmin=low, vmax=high)
            axes.set_title(f"{title} {i}", fontsize=9)
            axes.set_xlabel("frame", fontsize=8)
            axes.set_ylabel("bin", fontsize=8)
    figure.tight_layout()
    return _save(figure, path)


def describe_evaluation(result: dict[str, Any]) -> str:
    """A line or two for people: the headline numbers of :func:`evaluate_run`."""
    m = result["metrics"]
    shown = [
        (key, fmt)
        for key, fmt in (
            ("psnr_db", "PSNR {:.2f} dB"),
            ("mse", "MSE {:.5f}"),
            ("sd_db", "spectral distortion {:.2f} dB"),
            ("lsd_db", "LSD {:.2f} dB"),
            ("usage/0", "codes used {:.1%}"),
            ("perplexity/0", "perplexity {:.1f}"),
            ("bits_per_image", "{:.0f} bits/image"),
            ("entropy_bits_per_image", "entropy bound {:.0f} bits/image"),
        )
        if key in m
    ]
    numbers = ", ".join(fmt.format(m[key]) for key, fmt in shown)
    what = "images" if result["kind"] == "image" else "items"
    return (
        f"{result['split']} ({result['n_items']} {what}), step {result['step']}: {numbers}\n"
        f"wrote {', '.join(result['pictures'])} and metrics.json in {result['out']}"
    )
