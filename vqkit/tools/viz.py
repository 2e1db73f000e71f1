"""``vqkit viz vq``: watch a VQ layer (or a two-stage residual VQ) learn 2-D toy data.

The data are points from a mixture of Gaussians; the layer is the real
:class:`~vqkit.nn.bottleneck.VectorQuantizer` or :class:`~vqkit.nn.bottleneck.ResidualVQ` with no
encoder
in front (``z`` is the points themselves), started from its tiny random codebook (no k-means
initialisation) so the animation shows the codes travel to the clusters. Each frame shows the
points, the code vectors and their Voronoi cells (a dense argmin image over the plane), with the
step and the distortion; a residual VQ gets a second panel with the residuals left by stage 1 and
the cells of stage 2. Frames are drawn on matplotlib's Agg canvas (no pyplot) and joined into a GIF
by Pillow, as matplotlib's PillowWriter does; the last frame is also saved as a PNG.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor

from vqkit.errors import VqkitError
from vqkit.files import atomic_path, atomic_write_bytes, check_output
from vqkit.nn.bottleneck import ResidualVQ, VectorQuantizer
from vqkit.nn.codebook import CodebookOptions

UPDATES = ("ema", "loss")  # how the codebook learns: EMA of assigned points, or a codebook loss
GRID = 160  # pixels per side of the Voronoi image
BATCH = 256  # points per training step
LOSS_LR = 0.05  # Adam step size for the codebook-loss variant
# Bounds that keep memory small: the Voronoi image measures GRID**2 pixels against every code,
# and the GIF keeps one frame per step.
MAX_CODES = 1024
MAX_STEPS = 1000


@dataclass(frozen=True)
class ToyData:
    """Points ``(M, 2)`` from a mixture of ``len(centres)`` Gaussians."""

    points: Tensor
    centres: Tensor  # (C, 2)
    spread: float  # mean squared distance of a point from its own centre (the best distortion)


def mixture(n_points: int = 2000, n_clusters: int = 8, seed: int = 0) -> ToyData:
    """A seeded mixture of isotropic Gaussians with unequal weights and widths in ``[-4, 4]^2``."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(-3.5, 3.5, (n_clusters, 2))
    widths = rng.uniform(0.15, 0.5, n_clusters)
    weights = rng.dirichlet(np.full(n_clusters, 4.0))
    member = rng.choice(n_clusters, n_points, p=weights)
    points = centres[member] + rng.standard_normal((n_points, 2)) * widths[member, None]
    spread = float(np.mean(2 * widths[member] ** 2))
    return ToyData(torch.tensor(points, dtype=torch.float32), torch.tensor(centres), spread)


@dataclass
class ToyFrame:
    """The layer measured on all points after ``step`` training steps."""

    step: int
    distortion: list[float]  # mean squared error per point after stage 1..Q
    codes_used: list[int]  # per stage
    panels: list[tuple[Tensor, Tensor, VectorQuantizer]]  # per stage: its input rows, codebook


@dataclass
class VqAnimation:
    """What :func:`animate_vq` wrote and measured."""

    gif: Path
    png: Path
    steps: list[int] = field(default_factory=list)  # the training step of each frame
    distortion: list[list[float]] = field(default_factory=list)  # per frame, after stage 1..Q
    codes_used: list[list[int]] = field(default_factory=list)  # per frame, per stage
    spread: float = 0.0  # the data's own distortion around the true centres


def make_quantizer(stages: int, codebook_size: int, update: str) -> VectorQuantizer | ResidualVQ:
    """The layer to animate: 2-D latents, no projection, no k-means init, fast EMA, re-seeding."""
    if update not in UPDATES:
        raise VqkitError(f"--update must be one of {', '.join(UPDATES)}, got '{update}'")
    options = CodebookOptions(
        ema=update == "ema", decay=0.9, kmeans_init=False, dead_threshold=1.0, dead_window=10
    )
    if stages == 1:
        return VectorQuantizer(2, codebook_size, options=options)
    return ResidualVQ(2, codebook_size, stages, options=options)


def toy_training(
    *, stages: int = 1, steps: int = 60, codebook_size: int = 0, update: str = "ema", seed: int = 0
) -> Iterator[ToyFrame]:
    """Train a VQ layer of ``stages`` stages on :func:`mixture` data for ``steps`` steps of
    ``BATCH`` random points; yield its state before the first step and after each step.

    ``codebook_size`` 0 means 16 codes for one stage and 8 per stage for two.
    """
    if stages not in (1, 2) or not 1 <= steps <= MAX_STEPS or not 0 <= codebook_size <= MAX_CODES:
        raise VqkitError(
            f"need stages 1 or 2, steps 1..{MAX_STEPS} and codebook_size 0..{MAX_CODES}; got "
            f"{stages}, {steps}, {codebook_size}"
        )
    torch.manual_seed(seed)
    points = mixture(seed=seed).points
    vq = make_quantizer(stages, codebook_size or (16 if stages == 1 else 8), update)
    optimizer = torch.optim.Adam(vq.parameters(), lr=LOSS_LR) if update == "loss" else None
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps + 1):
        if step > 0:
            _train_step(vq, points, optimizer, generator)
        yield measure(vq, points, step)


def animate_vq(
    out: str | os.PathLike,
    *,
    stages: int = 1,
    steps: int = 60,
    codebook_size: int = 0,
    update: str = "ema",
    seed: int = 0,
    fps: int = 10,
) -> VqAnimation:
    """Animate :func:`toy_training`: one frame per step to ``out`` (a ``.gif``), the last frame
    beside it (``.png``, same stem)."""
    out = Path(out)
    check_output(out)
    if out.suffix.lower() != ".gif" or fps < 1:
        raise VqkitError(f"{out}: the animation must be a .gif file, at fps >= 1 (got {fps})")
    result = VqAnimation(out, out.with_suffix(".png"), spread=mixture(seed=seed).spread)
    canvas, frames = None, []
    options = {"codebook_size": codebook_size, "update": update, "seed": seed}
    for frame in toy_training(stages=stages, steps=steps, **options):
        canvas = canvas or _Canvas(stages, frame.panels[0][0])
        result.steps.append(frame.step)
        result.distortion.append(frame.distortion)
        result.codes_used.append(frame.codes_used)
        frames.append(canvas.draw(frame))
    _write_gif(out, frames, fps)
    with atomic_path(result.png) as tmp:
        frames[-1].save(tmp, format="PNG", optimize=True)
    return result


def _train_step(
    vq: VectorQuantizer | ResidualVQ,
    points: Tensor,
    optimizer: torch.optim.Optimizer | None,
    generator: torch.Generator,
) -> None:
    """One step on a random batch: EMA updates inside the layer, or a codebook-loss step."""
    batch = points[torch.randint(len(points), (BATCH,), generator=generator)]
    vq.train()
    out = vq(batch.T[None])  # z (1, 2, BATCH)
    if optimizer is not None:
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()


@torch.no_grad()
def measure(vq: VectorQuantizer | ResidualVQ, points: Tensor, step: int) -> ToyFrame:
    """Code all ``points`` ``(M, 2)`` in eval mode, stage by stage."""
    vq.eval()
    stages = list(vq.stages) if isinstance(vq, ResidualVQ) else [vq]
    frame = ToyFrame(step, [], [], [])
    residual = points
    for stage in stages:
        codes = stage.codes_rows(residual)
        frame.panels.append((residual, stage.codebook.vectors.detach().clone(), stage))
        residual = residual - stage.decode_rows(codes)
        frame.distortion.append(residual.pow(2).sum(1).mean().item())
        frame.codes_used.append(int(torch.unique(codes).numel()))
    return frame


class _Canvas:
    """One Agg figure reused for every frame: a panel per stage, artists updated in place."""

    def __init__(self, stages: int, points: Tensor) -> None:
        self.figure = Figure(figsize=(4.6 * stages, 4.9), dpi=72)
        self.canvas = FigureCanvasAgg(self.figure)
        self.panels = []
        for i in range(stages):
            axes = self.figure.add_subplot(1, stages, i + 1)
            image = axes.imshow(
                np.zeros((GRID, GRID)), origin="lower", cmap="tab20", vmin=0, vmax=19, alpha=0.45
            )
            dots = axes.scatter([], [], s=3, c="#333333", linewidths=0)
            codes = axes.scatter([], [], s=70, c="black", marker="X", edgecolors="white")
            axes.set_title("stage 1: points" if i == 0 else "stage 2: residuals", fontsize=10)
            axes.tick_params(labelsize=7)
            self.panels.append((axes, image, dots, codes))
        self.first_extent = _extent(points)
        self.laid_out = False

    @torch.no_grad()
    def draw(self, frame: ToyFrame) -> Image.Image:
        """Draw ``frame`` and return it as an RGB image."""
        for (axes, image, dots, codes), (rows, vectors, stage) in zip(
            self.panels, frame.panels, strict=True
        ):
            low, high = self.first_extent if axes is self.panels[0][0] else _extent(rows)
            axis = torch.linspace(low, high, GRID)
            grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2)
            cells = stage.codes_rows(grid).reshape(GRID, GRID) % 20
            image.set_data(cells.numpy())
            image.set_extent((low, high, low, high))
            dots.set_offsets(rows.numpy())
            codes.set_offsets(vectors.numpy())
            axes.set_xlim(low, high)
            axes.set_ylim(low, high)
        text = ", ".join(f"after stage {i + 1}: {d:.3f}" for i, d in enumerate(frame.distortion))
        counts = ", ".join(str(u) for u in frame.codes_used)
        self.figure.suptitle(
            f"step {frame.step}   distortion (MSE) {text}\ncodes used: {counts}", fontsize=10
        )
        if not self.laid_out:  # the layout is the same in every frame, and costly to compute
            self.figure.tight_layout()
            self.laid_out = True
        self.canvas.draw()
        return Image.fromarray(np.asarray(self.canvas.buffer_rgba())).convert("RGB")


def _extent(rows: Tensor) -> tuple[float, float]:
    """A square view around the rows: 1.1 times their largest absolute coordinate."""
    reach = max(float(rows.abs().max()) * 1.1, 1e-3)
    return -reach, reach


def _write_gif(path: Path, frames: list[Image.Image], fps: int) -> None:
    """A looping GIF, the last frame held for two seconds; one adaptive palette per frame."""
    palette = [
        f.quantize(colors=32, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        for f in frames
    ]
    durations = [round(1000 / fps)] * (len(frames) - 1) + [2000]
    buffer = io.BytesIO()
    palette[0].save(
        buffer,
        format="GIF",
        save_all=True,
        append_images=palette[1:],
        duration=durations,
        loop=0,
        optimize=True,
    )
    atomic_write_bytes(path, buffer.getvalue())
