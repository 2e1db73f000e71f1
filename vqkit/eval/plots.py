"""Pictures of a model's reconstructions (``vqkit evaluate``) and of a bench (the report)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vqkit.data.dataset import SegmentDataset, item_side_info
from vqkit.files import new_figure, save_figure


def draw_examples(
    examples: list[tuple[Tensor, Tensor]], dataset: SegmentDataset, out: Path
) -> list[Path]:
    """``out/grid.png`` of image ``examples`` (originals over reconstructions), or
    ``out/spectrograms.png`` of the first two items' features in dB."""
    if dataset.cache.config.features.kind == "image":
        x, x_hat = (torch.cat(v) for v in zip(*examples, strict=True))
        return [plot_image_grid(x, x_hat, out / "grid.png")]
    spectra = [
        tuple(dataset.normaliser.denormalise(v, _side(dataset, [i]))[0] for v in pair)
        for i, pair in enumerate(examples[:2])
    ]
    return [plot_feature_spectrograms(spectra, out / "spectrograms.png")]


def _side(dataset: SegmentDataset, indices: list[int]) -> Tensor:
    return torch.stack([item_side_info(dataset.normaliser, dataset.items[i]) for i in indices])


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
    figure = new_figure(top.shape[1] * inches + 0.2, 2 * top.shape[0] * inches + 0.7)
    for index, (title, image) in enumerate((("original", top), ("reconstruction", bottom)), 1):
        axes = figure.add_subplot(2, 1, index)
        axes.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        axes.set_title(title, fontsize=9)
        axes.axis("off")
    figure.tight_layout(pad=0.3)
    return save_figure(figure, path)


def plot_feature_spectrograms(spectra: list[tuple[Tensor, Tensor]], path: Path) -> Path:
    """Each item's features ``(F, N)`` in dB (left) beside its reconstruction (right)."""
    figure = new_figure(9.0, 2.2 * len(spectra) + 0.4)
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
    return save_figure(figure, path)
