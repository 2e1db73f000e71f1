"""Held-out evaluation: reconstruction loss, spectral distortion in dB on denormalised features,
and per-stage code usage and perplexity over a split of a feature cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vqkit.config import Config
from vqkit.data import SegmentDataset, item_side_info
from vqkit.errors import VqkitError
from vqkit.metrics import spectral_distortion_db
from vqkit.model import Autoencoder

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
    model: Autoencoder, dataset: SegmentDataset, config: Config, device: torch.device
) -> dict[str, float]:
    """Mean reconstruction loss, spectral distortion (dB, on denormalised features), and per-stage
    code usage and perplexity over the first ``eval_batches * batch_size`` items of ``dataset``.

    Items of equal shape are batched; every number is weighted by frames, so padding never counts.
    """
    model.eval()
    tc = config.train
    n = min(len(dataset), tc.eval_batches * tc.batch_size)
    totals: dict[str, float] = {}
    counts: Tensor | None = None
    for indices in equal_shape_batches(dataset, n, tc.batch_size):
        x = torch.stack([dataset[i] for i in indices]).to(device)
        out = model(x)
        weight = x.shape[0] * x.shape[-1]
        values = {"recon": reconstruction_loss(out.x_hat, x, tc.recon_loss).item()}
        values["aux"] = out.bottleneck.loss.item()
        if config.features.kind != "image":
            values["sd_db"] = spectral_distortion(dataset, indices, x, out.x_hat)
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


def spectral_distortion(
    dataset: SegmentDataset, indices: list[int], x: Tensor, x_hat: Tensor
) -> float:
    """Mean spectral distortion (dB) of a batch after undoing the dataset's normalisation."""
    normaliser = dataset.normaliser.to(x.device)
    side = torch.stack([item_side_info(normaliser, dataset.items[i]) for i in indices])
    side = side.to(x.device)
    x_db, x_hat_db = normaliser.denormalise(x, side), normaliser.denormalise(x_hat, side)
    return spectral_distortion_db(x_db, x_hat_db).mean().item()


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
