"""Validation over a split of a feature cache: reconstruction loss, per-stage code usage and
perplexity, and PSNR (images) or spectral distortion and LSD (audio, in dB on denormalised
features). The trainer logs :func:`evaluate`; ``vqkit evaluate`` reports it on a whole split."""

from __future__ import annotations

import torch
from torch import Tensor

from vqkit.config import Config
from vqkit.data.dataset import SegmentDataset, item_side_info
from vqkit.nn.codebook import code_counts, code_stats
from vqkit.nn.model import Autoencoder, AutoencoderOutput
from vqkit.train.losses import (
    LSD_FLOOR_DB,
    LossWeights,
    reconstruction_loss,
    spectral_distortion_db,
)


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
    """Mean reconstruction loss (plain, and ``objective``: weighted as training weights it),
    bottleneck stats (e.g. "kl"), PSNR (images) or spectral distances (audio;
    :func:`batch_metrics`), and per-stage code usage and perplexity counted over the first
    ``n_items`` items of ``dataset`` (default ``eval_batches * batch_size``).

    Items of equal shape are batched; every number is weighted by frames, so padding never counts.
    """
    model.eval()
    tc = config.train
    n = min(len(dataset), tc.eval_batches * tc.batch_size if n_items is None else n_items)
    totals: dict[str, float] = {}
    counts: Tensor | None = None
    weights = LossWeights(config, model.normaliser)
    for indices in equal_shape_batches(dataset, n, tc.batch_size):
        x = torch.stack([dataset[i] for i in indices]).to(device)
        out = model(x)
        weight = x.shape[0] * x.shape[-1]
        values = batch_metrics(dataset, indices, x, out, config, weights)
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
    dataset: SegmentDataset,
    indices: list[int],
    x: Tensor,
    out: AutoencoderOutput,
    config: Config,
    weights: LossWeights,
) -> dict[str, float]:
    """The numbers :func:`evaluate` averages for one batch ``x`` of ``dataset[indices]``."""
    kind = config.train.recon_loss
    values = {"recon": reconstruction_loss(out.x_hat, x, kind).item()}
    values["objective"] = reconstruction_loss(out.x_hat, x, kind, weights(x, out.x_hat)).item()
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
    log-magnitude (``stft``) features ``feature_lsd_db``: the definition of the bench's ``lsd_db``
    (:func:`vqkit.eval.metrics.log_spectral_distance_db`, magnitude dB being power dB, both spectra
    floored :data:`~vqkit.train.losses.LSD_FLOOR_DB` below the reference's loudest bin), applied
    to the model's feature frames instead of to resynthesised audio."""
    normaliser = dataset.normaliser  # on the CPU, where the dataset normalises: never moved
    side = torch.stack([item_side_info(normaliser, dataset.items[i]) for i in indices])
    x, x_hat = x.cpu(), x_hat.cpu()
    x_db, x_hat_db = normaliser.denormalise(x, side), normaliser.denormalise(x_hat, side)
    values = {"sd_db": spectral_distortion_db(x_db, x_hat_db).mean().item()}
    if dataset.cache.config.features.kind == "stft":
        floor = x_db.amax(dim=(1, 2), keepdim=True) - LSD_FLOOR_DB
        lsd = spectral_distortion_db(x_db.maximum(floor), x_hat_db.maximum(floor))
        values["feature_lsd_db"] = lsd.mean().item()
    return values
