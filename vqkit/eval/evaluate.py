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

import torch
from torch import Tensor

from vqkit.checkpoint import Checkpoint, load_checkpoint
from vqkit.config import config_to_dict
from vqkit.data.cache import FeatureCache
from vqkit.data.dataset import SegmentDataset
from vqkit.errors import VqkitError, shown
from vqkit.eval.plots import draw_examples
from vqkit.files import check_output, write_json
from vqkit.nn.model import Autoencoder
from vqkit.run import RunFolder, resolve_model
from vqkit.train.distributed import pick_device
from vqkit.train.log import plot_losses, read_metrics
from vqkit.train.validate import eval_frames, evaluate


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
    device = str(pick_device(device, setting="device"))  # before a bad name can blame the model
    check_output(out, run, data)
    path = resolve_model(run)
    checkpoint = load_checkpoint(path, map_location=device)
    cache = FeatureCache(data)
    config = checkpoint.config
    check_compatible(checkpoint, cache, path)
    dataset = SegmentDataset(cache, split, eval_frames(config), train=False)
    if len(dataset) == 0:
        raise VqkitError(f"{cache.root} has no '{split}' items to evaluate")
    dataset.normaliser = checkpoint.model.normaliser
    model = checkpoint.model.to(device)
    metrics = evaluate(model, dataset, config, torch.device(device), n_items=len(dataset))
    out = Path(out)
    examples = _examples(model, dataset, min(max(n_grid, 1), len(dataset)), device)
    if config.features.kind == "image":
        metrics.update(code_bits(model, tuple(examples[0][0].shape[-2:]), metrics))
    pictures = draw_examples(examples, dataset, out)
    folder = RunFolder.of(run, path)
    if folder is not None:
        plot_losses(read_metrics(folder.metrics), out / "loss.png")
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


def check_compatible(checkpoint: Checkpoint, cache: FeatureCache, path: Path) -> None:
    """Raise :class:`VqkitError` unless ``cache`` holds the features the model was trained on."""
    trained, held = config_to_dict(checkpoint.config), config_to_dict(cache.config)
    image = checkpoint.config.features.kind == "image"
    sections = ("features",) if image else ("audio", "features")
    differ = [
        f"{section}.{key} {shown(repr(trained[section][key]))} (model) vs "
        f"{shown(repr(held[section][key]))} (data)"
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


def describe_evaluation(result: dict[str, Any]) -> str:
    """A line or two for people: the headline numbers of :func:`evaluate_run`."""
    m = result["metrics"]
    shown = [
        (key, fmt)
        for key, fmt in (
            ("psnr_db", "PSNR {:.2f} dB"),
            ("mse", "MSE {:.5f}"),
            ("sd_db", "spectral distortion {:.2f} dB"),
            ("feature_lsd_db", "feature LSD {:.2f} dB"),
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
