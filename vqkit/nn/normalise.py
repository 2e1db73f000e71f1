"""Feature normalisers with exact inverses (re-exported by :mod:`vqkit.audio.frontends`).

- per-utterance min-max to ``[low, high]`` (``[0, 1]`` "minmax" or ``[-1, 1]`` "minmax_sym"): the
  min and max are side information a decoder needs, so they are returned and must be counted in
  the bitrate;
- dataset-level mean/std per frequency bin (:class:`MeanStd`), statistics from the training split.

:class:`Normaliser` puts them behind one interface chosen by ``FeatureConfig.normalise``. Every
model carries one as its ``normaliser`` submodule, so the statistics it was trained with travel in
its state dict (``normaliser.meanstd.mean`` and ``.std``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from vqkit.config import Normalise, choices
from vqkit.errors import VqkitError

NORMALISERS = choices(Normalise)
MIN_SPAN = 1e-6  # a constant utterance (digital silence) maps to ``low`` instead of 0/0


def minmax_normalise(
    x: Tensor, low: float = 0.0, high: float = 1.0
) -> tuple[Tensor, Tensor, Tensor]:
    """Scale each utterance ``(..., F, N)`` to ``[low, high]``.

    Returns ``(x_norm, x_min, x_max)`` with ``x_min`` and ``x_max`` of shape ``x.shape[:-2]``:
    the min and max over the last two dimensions, which :func:`minmax_denormalise` needs.
    """
    if x.dim() < 2:
        raise ValueError(f"expected features (..., F, N), got shape {tuple(x.shape)}")
    if not high > low:
        raise ValueError(f"need high > low, got low={low}, high={high}")
    x_min = x.amin(dim=(-2, -1))
    x_max = x.amax(dim=(-2, -1))
    span = _span(x_min, x_max)
    x_norm = low + (x - x_min[..., None, None]) / span[..., None, None] * (high - low)
    return x_norm, x_min, x_max


def minmax_denormalise(
    x_norm: Tensor, x_min: Tensor, x_max: Tensor, low: float = 0.0, high: float = 1.0
) -> Tensor:
    """Exact inverse of :func:`minmax_normalise`: ``x_min``, ``x_max`` of shape
    ``x_norm.shape[:-2]`` (or broadcastable to it)."""
    x_min = torch.as_tensor(x_min, dtype=x_norm.dtype, device=x_norm.device)
    x_max = torch.as_tensor(x_max, dtype=x_norm.dtype, device=x_norm.device)
    span = _span(x_min, x_max)
    return x_min[..., None, None] + (x_norm - low) / (high - low) * span[..., None, None]


def _span(x_min: Tensor, x_max: Tensor) -> Tensor:
    return (x_max - x_min).clamp(min=MIN_SPAN)


class MeanStd(torch.nn.Module):
    """Per-bin standardisation with dataset statistics: buffers ``mean`` and ``std`` ``(F,)``."""

    def __init__(self, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.float32)
        std = torch.as_tensor(std, dtype=torch.float32)
        if mean.dim() != 1 or std.shape != mean.shape:
            raise ValueError(f"expected mean and std (F,), got {mean.shape} and {std.shape}")
        if not std.is_meta and not bool((std > 0).all()):  # meta: shapes only, no values
            raise ValueError("std must be positive in every bin")
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def normalise(self, x: Tensor) -> Tensor:
        """``(B, F, N)`` or ``(F, N)`` -> the same shape, zero mean and unit std per bin."""
        self._check(x)
        return (x - self.mean[:, None]) / self.std[:, None]

    def denormalise(self, y: Tensor) -> Tensor:
        """Exact inverse of :meth:`normalise`."""
        self._check(y)
        return y * self.std[:, None] + self.mean[:, None]

    def _check(self, x: Tensor) -> None:
        if x.dim() < 2 or x.shape[-2] != self.mean.shape[0]:
            raise ValueError(f"expected (B, {self.mean.shape[0]}, N), got {tuple(x.shape)}")


class Normaliser(torch.nn.Module):
    """The normalisation ``kind`` ("none" | "minmax" | "minmax_sym" | "meanstd") as one interface.

    ``side_info(x)`` gives the per-utterance values the inverse needs, ``(B, n_side)``: min and
    max in dB for the min-max kinds (``n_side = 2``; side information in the bitrate), nothing for
    the others (``n_side = 0``). ``denormalise(normalise(x, side), side) == x``.
    """

    def __init__(self, kind: str, mean: Tensor | None = None, std: Tensor | None = None) -> None:
        super().__init__()
        if kind not in NORMALISERS:
            raise VqkitError(f"features.normalise must be one of {', '.join(NORMALISERS)}")
        self.kind = kind
        self.low, self.high = (-1.0, 1.0) if kind == "minmax_sym" else (0.0, 1.0)
        self.n_side = 2 if kind.startswith("minmax") else 0
        self.meanstd = None
        if kind == "meanstd":
            if mean is None or std is None:
                raise ValueError("normalise='meanstd' needs the dataset mean and std")
            self.meanstd = MeanStd(mean, std)

    def set_statistics(self, mean: Tensor, std: Tensor) -> None:
        """Copy the dataset ``mean`` and ``std`` ``(F,)`` of a "meanstd" normaliser in place."""
        if self.meanstd is None:
            raise ValueError(f"a '{self.kind}' normaliser has no statistics")
        fresh = MeanStd(mean, std)  # checks shapes and a positive std
        if fresh.mean.shape != self.meanstd.mean.shape:
            raise ValueError(
                f"expected statistics of shape {tuple(self.meanstd.mean.shape)}, "
                f"got {tuple(fresh.mean.shape)}"
            )
        self.meanstd.load_state_dict(fresh.state_dict())

    def check(self) -> None:
        """Raise ValueError unless the statistics are finite with a positive std."""
        if self.meanstd is None:
            return
        mean, std = self.meanstd.mean, self.meanstd.std
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
            raise ValueError("mean or std holds NaN or Inf")
        if not bool((std > 0).all()):
            raise ValueError("std must be positive in every bin")

    def side_info(self, x: Tensor) -> Tensor:
        """``(B, F, N)`` -> ``(B, n_side)``."""
        if self.n_side == 0:
            return x.new_zeros(x.shape[0], 0)
        return torch.stack([x.amin(dim=(-2, -1)), x.amax(dim=(-2, -1))], dim=-1)

    def normalise(self, x: Tensor, side: Tensor | None = None) -> Tensor:
        """``(B, F, N)`` dB -> normalised ``(B, F, N)``; ``side`` from :meth:`side_info` (computed
        from ``x`` when None; pass an utterance's own side info to normalise a crop of it)."""
        if self.meanstd is not None:
            return self.meanstd.normalise(x)
        if self.n_side == 0:
            return x
        side = self.side_info(x) if side is None else side
        span = _span(side[..., 0], side[..., 1])[..., None, None]
        return self.low + (x - side[..., 0, None, None]) / span * (self.high - self.low)

    def denormalise(self, y: Tensor, side: Tensor) -> Tensor:
        """Normalised ``(B, F, N)`` -> dB ``(B, F, N)``, with the ``side`` info of the input."""
        if self.meanstd is not None:
            return self.meanstd.denormalise(y)
        if self.n_side == 0:
            return y
        return minmax_denormalise(y, side[..., 0], side[..., 1], self.low, self.high)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"
