"""Building blocks shared by the encoders and decoders: convolutions, residual stacks, padding.

Every block is written once for 1-D (``(B, C, N)``) and 2-D (``(B, C, H, W)``) inputs, chosen by
``dims``. Strided convolutions here map a length ``L`` that is a multiple of the stride to exactly
``L / stride`` and their transposes map it back to exactly ``L``, so a model only has to pad its
input to a multiple of the total stride and crop its output (see :func:`pad_to_multiple`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vqkit.errors import VqkitError


def conv(dims: int, *args, **kwargs) -> nn.Module:
    """``nn.Conv1d`` or ``nn.Conv2d``."""
    return (nn.Conv1d, nn.Conv2d)[dims - 1](*args, **kwargs)


def conv_transpose(dims: int, *args, **kwargs) -> nn.Module:
    """``nn.ConvTranspose1d`` or ``nn.ConvTranspose2d``."""
    return (nn.ConvTranspose1d, nn.ConvTranspose2d)[dims - 1](*args, **kwargs)


def batch_norm(dims: int, channels: int) -> nn.Module:
    """``nn.BatchNorm1d`` or ``nn.BatchNorm2d``."""
    return (nn.BatchNorm1d, nn.BatchNorm2d)[dims - 1](channels)


def exact_padding(kernel: int, stride: int) -> tuple[int, int]:
    """``(padding, output_padding)`` so that a conv maps ``L = k * stride`` to ``k`` and back.

    A conv gives ``floor((L + 2p - kernel) / stride) + 1``, which is ``L / stride`` when
    ``kernel - stride <= 2p <= kernel - 1``; its transpose gives
    ``(L' - 1) * stride - 2p + kernel + output_padding``, which is ``L' * stride`` when
    ``output_padding = stride - kernel + 2p`` (it must be below ``stride``).
    """
    if kernel < 1 or stride < 1:
        raise VqkitError(f"kernel and stride must be >= 1, got kernel {kernel}, stride {stride}")
    padding = max(0, math.ceil((kernel - stride) / 2))
    output_padding = stride - kernel + 2 * padding
    if output_padding >= stride:
        raise VqkitError(
            f"an even kernel ({kernel}) with stride 1 cannot keep the length; use an odd kernel"
        )
    return padding, output_padding


class CausalConv1d(nn.Conv1d):
    """A 1-D conv padded on the left only, by ``kernel - stride``: it maps ``L`` (a multiple of
    the stride) to ``L / stride`` and output frame ``i`` sees input frames up to
    ``(i + 1) * stride - 1``, the last of its own, none later."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1) -> None:
        if kernel < stride:
            raise VqkitError(f"a causal conv needs kernel >= stride, got {kernel} < {stride}")
        super().__init__(in_channels, out_channels, kernel, stride)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(F.pad(x, (self.kernel_size[0] - self.stride[0], 0)))


class CausalConvTranspose1d(nn.ConvTranspose1d):
    """A 1-D transposed conv that keeps the first ``L * stride`` outputs of ``L`` inputs: output
    frame ``o`` sees input frames up to ``o // stride``."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int) -> None:
        super().__init__(in_channels, out_channels, kernel, stride)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x)[..., : x.shape[-1] * self.stride[0]]


def advance(x: Tensor, frames: int) -> Tensor:
    """``(B, C, N)`` moved ``frames`` earlier (frame ``i`` is then frame ``i + frames``), zeros at
    the end: a causal net fed this looks ``frames`` ahead."""
    return F.pad(x, (0, frames))[..., frames:] if frames else x


def conv3(dims: int, in_channels: int, out_channels: int, causal: bool = False) -> nn.Module:
    """A 3-wide conv that keeps the length: centred, or causal (1-D)."""
    if causal:
        return CausalConv1d(in_channels, out_channels, 3)
    return conv(dims, in_channels, out_channels, 3, padding=1)


class ResidualBlock(nn.Module):
    """``x + conv1x1(relu(conv3x3(relu(x))))``, the VQ-VAE paper's block (``causal``: the 3-wide
    conv sees no later frame; 1-D).

    Shapes: ``(B, channels, *S) -> (B, channels, *S)``.
    """

    def __init__(self, channels: int, hidden: int, dims: int, causal: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.ReLU(),
            conv3(dims, channels, hidden, causal),
            nn.ReLU(),
            conv(dims, hidden, channels, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


def residual_stack(
    channels: int, hidden: int, n_blocks: int, dims: int, causal: bool = False
) -> nn.Sequential:
    """``n_blocks`` residual blocks followed by a ReLU, as in the VQ-VAE paper."""
    blocks = [ResidualBlock(channels, hidden, dims, causal) for _ in range(n_blocks)]
    return nn.Sequential(*blocks, nn.ReLU())


def pad_to_multiple(x: Tensor, multiple: int | tuple[int, ...], n_axes: int) -> Tensor:
    """Zero-pad the last ``n_axes`` axes of ``x`` on the right to a multiple of ``multiple``.

    ``multiple`` is one factor for all axes or one per axis. Returns ``x`` itself when nothing
    needs padding.
    """
    multiples = (multiple,) * n_axes if isinstance(multiple, int) else tuple(multiple)
    sizes = x.shape[-n_axes:]
    extra = [-size % m for size, m in zip(sizes, multiples, strict=True)]
    if not any(extra):
        return x
    pad: list[int] = []
    for e in reversed(extra):  # F.pad lists the last axis first
        pad += [0, e]
    return F.pad(x, pad)


def crop(x: Tensor, size: tuple[int | None, ...]) -> Tensor:
    """Keep the first ``size[i]`` entries of each of the last ``len(size)`` axes (None: all)."""
    index = [slice(None)] * (x.dim() - len(size)) + [slice(0, s) for s in size]
    return x[tuple(index)]


def flatten_latent(z: Tensor) -> Tensor:
    """``(B, D, *S) -> (B * prod(S), D)``: one row per latent vector."""
    return z.movedim(1, -1).reshape(-1, z.shape[1])


def unflatten_latent(rows: Tensor, like_shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Inverse of :func:`flatten_latent`: ``(B * prod(S), D') -> (B, D', *S)``.

    ``like_shape`` is ``(B, *S)``, the shape of the latent without its channel axis. The result
    is contiguous: a conv may take another code path (and round differently) for another memory
    layout, and decoding must give the same bits however the latent was made.
    """
    return rows.reshape(*like_shape, rows.shape[-1]).movedim(-1, 1).contiguous()
