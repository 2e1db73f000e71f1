"""Latent bottlenecks behind one interface: identity (AE), Gaussian (VAE), VQ, residual VQ, FSQ.

Every bottleneck maps an encoder output ``z`` ``(B, D, *S)`` to a :class:`BottleneckOutput`, so the
trainer treats every family alike. Discrete ones also turn ``z`` into integer ``codes``
``(B, Q, *S)`` and back; continuous ones pass a latent through ``quantize``/``dequantize``
(the Gaussian gives its posterior mean). In eval mode ``dequantize(quantize(z))`` equals
``forward(z).z_q`` exactly: the straight-through estimator is written as
``q + (e - e.detach())``, which is ``q`` to the last bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vqkit.config import BottleneckConfig, BottleneckKind, choices
from vqkit.errors import VqkitError
from vqkit.nn.blocks import flatten_latent, unflatten_latent
from vqkit.nn.codebook import Codebook, CodebookOptions, broadcast, code_counts, code_stats

KINDS = choices(BottleneckKind)


@dataclass
class BottleneckOutput:
    """What every bottleneck returns."""

    z_q: Tensor  # latent for the decoder, same shape as the input z (B, D, *S)
    loss: Tensor  # scalar auxiliary loss (commitment/codebook, KL, or zero)
    codes: Tensor | None  # (B, Q, *S) int64 for discrete bottlenecks, else None
    stats: dict[str, float]  # e.g. "perplexity/0", "usage/0", "kl"; plain floats


class Bottleneck(nn.Module):
    """Base class: ``forward(z) -> BottleneckOutput``, ``quantize`` and ``dequantize``."""

    discrete: bool = False
    n_codebooks: int = 0  # Q: codebooks per latent vector (0 for continuous bottlenecks)
    codebook_size: int = 0  # entries per codebook (0 for continuous bottlenecks)

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        self.latent_dim = latent_dim

    def forward(self, z: Tensor, n_codebooks: int | None = None) -> BottleneckOutput:
        raise NotImplementedError

    def quantize(self, z: Tensor, n_codebooks: int | None = None, beam: int = 1) -> Tensor:
        """Discrete: codes ``(B, Q, *S)``; continuous: the latent the decoder takes.

        ``beam``: the paths a multi-stage search keeps (:class:`ResidualVQ`); every other search
        is exact with one."""
        raise NotImplementedError

    def dequantize(self, codes: Tensor) -> Tensor:
        """Discrete: codes ``(B, Q, *S)`` to ``z_q`` ``(B, D, *S)``; continuous: the identity."""
        raise NotImplementedError

    def _check(self, z: Tensor) -> None:
        if z.dim() < 2 or z.shape[1] != self.latent_dim:
            raise ValueError(
                f"expected z of shape (B, {self.latent_dim}, ...), got {tuple(z.shape)}"
            )

    def _zero(self, z: Tensor) -> Tensor:
        return z.new_zeros(())


class Identity(Bottleneck):
    """No bottleneck (a plain autoencoder): ``z_q = z``."""

    def forward(self, z: Tensor, n_codebooks: int | None = None) -> BottleneckOutput:
        self._check(z)
        return BottleneckOutput(z, self._zero(z), None, {})

    def quantize(self, z: Tensor, n_codebooks: int | None = None, beam: int = 1) -> Tensor:
        self._check(z)
        return z

    def dequantize(self, codes: Tensor) -> Tensor:
        return codes


def gaussian_kl(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per latent element, averaged: a scalar."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()


def _channel_linear(layer: nn.Module, z: Tensor) -> Tensor:
    """Apply a linear layer to the channel axis of ``(B, D, *S)``."""
    return layer(z.movedim(1, -1)).movedim(-1, 1)


class Gaussian(Bottleneck):
    """A VAE posterior ``N(mean(z), exp(logvar(z)))``; loss ``kl_weight * KL``.

    Training samples by reparameterisation; eval mode (and ``quantize``) gives the mean.
    """

    def __init__(self, latent_dim: int, kl_weight: float = 1.0) -> None:
        super().__init__(latent_dim)
        self.kl_weight = kl_weight
        self.mean = nn.Linear(latent_dim, latent_dim)
        self.logvar = nn.Linear(latent_dim, latent_dim)

    def posterior(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean, logvar)``, each ``(B, D, *S)``."""
        self._check(z)
        logvar = _channel_linear(self.logvar, z).clamp(-30.0, 20.0)
        return _channel_linear(self.mean, z), logvar

    def forward(self, z: Tensor, n_codebooks: int | None = None) -> BottleneckOutput:
        mean, logvar = self.posterior(z)
        z_q = mean + (0.5 * logvar).exp() * torch.randn_like(mean) if self.training else mean
        kl = gaussian_kl(mean, logvar)
        return BottleneckOutput(z_q, self.kl_weight * kl, None, {"kl": kl.item()})

    def quantize(self, z: Tensor, n_codebooks: int | None = None, beam: int = 1) -> Tensor:
        return self.posterior(z)[0]

    def dequantize(self, codes: Tensor) -> Tensor:
        return codes


class VectorQuantizer(Bottleneck):
    """One codebook (VQ-VAE): nearest code, straight-through, commitment ``beta``.

    With ``codebook_dim`` below ``latent_dim`` the search happens after a linear projection
    (and back after it); with ``options.l2_normalize`` on unit vectors. The codebook learns by
    EMA or, with ``options.ema`` false, by a codebook loss.
    """

    discrete = True
    n_codebooks = 1

    def __init__(
        self,
        latent_dim: int,
        codebook_size: int,
        codebook_dim: int = 0,
        beta: float = 0.25,
        options: CodebookOptions | None = None,
    ) -> None:
        super().__init__(latent_dim)
        self.codebook_size = codebook_size
        self.beta = beta
        self.options = options or CodebookOptions()
        dim = codebook_dim or latent_dim
        projected = dim != latent_dim
        self.project_in = nn.Linear(latent_dim, dim) if projected else nn.Identity()
        self.project_out = nn.Linear(dim, latent_dim) if projected else nn.Identity()
        self.codebook = Codebook(codebook_size, dim, self.options)

    def _embed(self, rows: Tensor) -> Tensor:
        e = self.project_in(rows)
        return F.normalize(e, dim=1) if self.options.l2_normalize else e

    def forward_rows(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(M, D) -> (z_q (M, D), loss, codes (M,))``; trains the codebook in training mode."""
        e = self._embed(rows)
        if self.training:
            self.codebook.initialise(e.detach())
        codes = self.codebook.search(e)
        q = self.codebook.lookup(codes)
        # losses before the straight-through substitution
        loss = self.beta * F.mse_loss(e, q.detach())
        if not self.options.ema:
            loss = loss + F.mse_loss(e.detach(), q)
        if self.training:
            self.codebook.update(e.detach(), codes)
        return self.project_out(q.detach() + (e - e.detach())), loss, codes

    def codes_rows(self, rows: Tensor) -> Tensor:
        """``(M, D) -> (M,)`` codes, without side effects."""
        return self.codebook.search(self._embed(rows))

    def decode_rows(self, codes: Tensor) -> Tensor:
        """``(M,) -> (M, D)`` decoder latents."""
        return self.project_out(self.codebook.lookup(codes))

    def forward(self, z: Tensor, n_codebooks: int | None = None) -> BottleneckOutput:
        self._check(z)
        _check_n(n_codebooks, 1)
        z_q, loss, codes = self.forward_rows(flatten_latent(z))
        stats = code_stats(code_counts(codes.reshape(1, 1, -1), self.codebook_size))
        codes = codes.reshape(z.shape[0], 1, *z.shape[2:])
        return BottleneckOutput(unflatten_latent(z_q, _outer(z)), loss, codes, stats)

    def quantize(self, z: Tensor, n_codebooks: int | None = None, beam: int = 1) -> Tensor:
        self._check(z)
        _check_n(n_codebooks, 1)
        return self.codes_rows(flatten_latent(z)).reshape(z.shape[0], 1, *z.shape[2:])

    def dequantize(self, codes: Tensor) -> Tensor:
        _check_codes(codes, 1)
        return unflatten_latent(self.decode_rows(codes[:, 0].flatten()), _outer_codes(codes))


def _outer(z: Tensor) -> tuple[int, ...]:
    return (z.shape[0], *z.shape[2:])


def _outer_codes(codes: Tensor) -> tuple[int, ...]:
    return (codes.shape[0], *codes.shape[2:])


def _check_n(n_codebooks: int | None, most: int) -> None:
    if n_codebooks is not None and not 1 <= n_codebooks <= most:
        raise ValueError(f"n_codebooks must be in 1..{most}, got {n_codebooks}")


def _check_codes(codes: Tensor, most: int) -> None:
    if codes.dim() < 2 or not 1 <= codes.shape[1] <= most or codes.is_floating_point():
        raise ValueError(f"expected integer codes of shape (B, 1..{most}, ...), got {codes.shape}")


class ResidualVQ(Bottleneck):
    """``n_codebooks`` vector quantizers, each coding what the previous ones left.

    With ``quantizer_dropout`` p, a training batch uses a random 1..N stages with probability p
    (the same count on every rank), so one model decodes at any number of stages. The loss is
    the mean of the stages' losses, so ``beta`` means the same for any N.
    """

    discrete = True

    def __init__(
        self,
        latent_dim: int,
        codebook_size: int,
        n_codebooks: int,
        codebook_dim: int = 0,
        beta: float = 0.25,
        options: CodebookOptions | None = None,
        quantizer_dropout: float = 0.0,
    ) -> None:
        super().__init__(latent_dim)
        self.codebook_size = codebook_size
        self.n_codebooks = n_codebooks
        self.quantizer_dropout = quantizer_dropout
        self.stages = nn.ModuleList(
            VectorQuantizer(latent_dim, codebook_size, codebook_dim, beta, options)
            for _ in range(n_codebooks)
        )

    def _n_stages(self, n_codebooks: int | None) -> int:
        _check_n(n_codebooks, self.n_codebooks)
        if n_codebooks is not None:
            return n_codebooks
        if not (self.training and self.quantizer_dropout > 0):
            return self.n_codebooks
        n = torch.tensor(self.n_codebooks)
        if torch.rand(()) < self.quantizer_dropout:
            n = torch.randint(1, self.n_codebooks + 1, ())
        device = self.stages[0].codebook.usage.device  # where a process group can broadcast
        return int(broadcast(n.to(device)))

    def forward(self, z: Tensor, n_codebooks: int | None = None) -> BottleneckOutput:
        self._check(z)
        residual = flatten_latent(z)
        z_q = torch.zeros_like(residual)
        losses, codes, stats = [], [], {}
        for i, stage in enumerate(self.stages[: self._n_stages(n_codebooks)]):
            z_q_i, loss_i, codes_i = stage.forward_rows(residual)
            z_q = z_q + z_q_i
            residual = residual - z_q_i
            losses.append(loss_i)
            codes.append(codes_i)
            stats |= code_stats(code_counts(codes_i.reshape(1, 1, -1), self.codebook_size), i)
        codes = torch.stack(codes, 1).reshape(*_outer(z), -1).movedim(-1, 1)
        z_q = unflatten_latent(z_q, _outer(z))
        return BottleneckOutput(z_q, torch.stack(losses).mean(), codes, stats)

    def quantize(self, z: Tensor, n_codebooks: int | None = None, beam: int = 1) -> Tensor:
        """Greedy with ``beam`` 1: each stage takes its own nearest code to what the stages before
        left. With more, the ``beam`` paths through the stages with the smallest residual are
        kept, each extended by every code of the next stage, and the best path at the end wins:
        a closer ``z_q`` for the same bits (the decoder is unchanged)."""
        self._check(z)
        _check_n(n_codebooks, self.n_codebooks)
        if beam < 1:
            raise ValueError(f"beam must be at least 1, got {beam}")
        stages = self.stages[: n_codebooks or self.n_codebooks]
        residual = flatten_latent(z)
        if beam > 1:
            codes = _beam_search(stages, residual, beam)
        else:
            codes = []
            for stage in stages:
                codes.append(stage.codes_rows(residual))
                residual = residual - stage.decode_rows(codes[-1])
            codes = torch.stack(codes, 1)
        return codes.reshape(*_outer(z), -1).movedim(-1, 1)

    def dequantize(self, codes: Tensor) -> Tensor:
        """Codes of the first ``Q <= n_codebooks`` stages ``(B, Q, *S)`` to ``(B, D, *S)``."""
        _check_codes(codes, self.n_codebooks)
        rows = codes.movedim(1, -1).reshape(-1, codes.shape[1])
        z_q = None
        for i in range(codes.shape[1]):
            z_q_i = self.stages[i].decode_rows(rows[:, i])
            # same order of additions as forward, so the result is bit-identical
            z_q = torch.zeros_like(z_q_i) + z_q_i if z_q is None else z_q + z_q_i
        return unflatten_latent(z_q, _outer_codes(codes))


def _beam_search(stages: nn.ModuleList, rows: Tensor, beam: int) -> Tensor:
    """Codes ``(M, N)`` of ``rows`` ``(M, D)`` through ``stages``: at each stage every kept path's
    residual meets every code, and the ``beam`` closest (path, code) pairs go on."""
    m = rows.shape[0]
    residual = rows[:, None]  # (M, K, D): the residual each kept path leaves
    codes = torch.zeros(m, 1, 0, dtype=torch.long, device=rows.device)
    for stage in stages:
        size = stage.codebook_size
        entries = stage.decode_rows(torch.arange(size, device=rows.device))  # (C, D)
        flat = residual.reshape(-1, residual.shape[-1])
        # minus the squared distance of every (path, code): topk's largest is the faster search
        closeness = torch.addmm(entries.square().sum(-1).neg(), flat, entries.T, alpha=2)
        closeness = closeness.sub_(flat.square().sum(-1, keepdim=True)).reshape(m, -1)
        kept = closeness.topk(min(beam, closeness.shape[1])).indices  # sorted: 0 is the best
        path, code = kept.div(size, rounding_mode="floor"), kept % size
        residual = _paths(residual, path) - entries[code]
        codes = torch.cat([_paths(codes, path), code[..., None]], -1)
    return codes[:, 0]


def _paths(t: Tensor, path: Tensor) -> Tensor:
    """The rows ``path`` ``(M, K')`` of ``t`` ``(M, K, X)``: ``(M, K', X)``."""
    return t.gather(1, path[..., None].expand(-1, -1, t.shape[-1]))


class FSQ(Bottleneck):
    """Finite scalar quantization: each of ``len(levels)`` channels rounded to ``levels[i]`` values.

    It has no codebook to collapse and no auxiliary loss. A latent vector's code is the
    mixed-radix number of its digits, in ``0 .. prod(levels) - 1``.
    """

    discrete = True
    n_codebooks = 1

    def __init__(self, latent_dim: int, levels: tuple[int, ...]) -> None:
        super().__init__(latent_dim)
        if not levels or min(levels) < 2:
            raise VqkitError(f"bottleneck.fsq_levels must be integers >= 2, got {list(levels)}")
        self.codebook_size = math.prod(levels)
        self.register_buffer("levels", torch.tensor(levels), persistent=False)
        basis = torch.cumprod(torch.tensor((1, *levels[:-1])), 0)
        self.register_buffer("basis", basis, persistent=False)
        projected = len(levels) != latent_dim
        self.project_in = nn.Linear(latent_dim, len(levels)) if projected else nn.Identity()
        self.project_out = nn.Linear(len(levels), latent_dim) if projected else nn.Identity()

    def _half_width(self) -> Tensor:
        return (self.levels // 2).float()

    def _round(self, rows: Tensor) -> Tensor:
        """``(M, D) -> (M, L)`` integer-valued digits centred on 0, with straight-through."""
        bounded = fsq_bound(self.project_in(rows), self.levels)
        return bounded.round().detach() + (bounded - bounded.detach())

    def forward(self, z: Tensor, n_codebooks: int | None = None) -> BottleneckOutput:
        self._check(z)
        _check_n(n_codebooks, 1)
        digits = self._round(flatten_latent(z))
        codes = self._index(digits)
        z_q = unflatten_latent(self.project_out(digits / self._half_width()), _outer(z))
        stats = code_stats(code_counts(codes.reshape(1, 1, -1), self.codebook_size))
        codes = codes.reshape(z.shape[0], 1, *z.shape[2:])
        return BottleneckOutput(z_q, self._zero(z), codes, stats)

    def _index(self, digits: Tensor) -> Tensor:
        return fsq_codes(digits.detach(), self.levels, self.basis)

    def quantize(self, z: Tensor, n_codebooks: int | None = None, beam: int = 1) -> Tensor:
        self._check(z)
        _check_n(n_codebooks, 1)
        codes = self._index(self._round(flatten_latent(z)))
        return codes.reshape(z.shape[0], 1, *z.shape[2:])

    def dequantize(self, codes: Tensor) -> Tensor:
        _check_codes(codes, 1)
        digits = fsq_digits(codes[:, 0].flatten(), self.levels, self.basis)
        z_q = self.project_out(digits / self._half_width())
        return unflatten_latent(z_q, _outer_codes(codes))


def fsq_bound(e: Tensor, levels: Tensor) -> Tensor:
    """FSQ's bounding of projected rows ``(M, L)``: each channel squashed so that rounding gives
    ``levels[i]`` integer values centred on 0 (plain tensor code, also used by the export)."""
    half_l = (levels - 1) * (1 + 1e-3) / 2
    offset = (levels % 2 == 0).float() * 0.5
    return torch.tanh(e + torch.atanh(offset / half_l)) * half_l - offset


def fsq_codes(digits: Tensor, levels: Tensor, basis: Tensor) -> Tensor:
    """Integer digits ``(M, L)`` centred on 0 -> their mixed-radix codes ``(M,)``."""
    return ((digits + (levels // 2).float()).long() * basis).sum(1)


def fsq_digits(codes: Tensor, levels: Tensor, basis: Tensor) -> Tensor:
    """The inverse of :func:`fsq_codes`: codes ``(M,)`` -> float digits ``(M, L)``."""
    return ((codes.unsqueeze(1) // basis) % levels - levels // 2).float()


def build_bottleneck(config: BottleneckConfig, latent_dim: int) -> Bottleneck:
    """The bottleneck that ``config.kind`` names, for encoder outputs of ``latent_dim`` channels."""
    kind = config.kind
    if kind == "identity":
        return Identity(latent_dim)
    if kind == "gaussian":
        return Gaussian(latent_dim, config.kl_weight)
    if kind == "fsq":
        return FSQ(latent_dim, config.fsq_levels)
    if kind not in ("vq", "rvq"):
        raise VqkitError(f"unknown bottleneck.kind '{kind}'; valid: {', '.join(KINDS)}")
    _check_vq_config(config)
    options = CodebookOptions(
        ema=config.ema,
        decay=config.decay,
        kmeans_init=config.kmeans_init,
        kmeans_iters=config.kmeans_iters,
        dead_threshold=config.dead_threshold,
        dead_window=config.dead_window,
        l2_normalize=config.l2_normalize,
    )
    size, dim, beta = config.codebook_size, config.codebook_dim, config.beta
    if kind == "vq":
        return VectorQuantizer(latent_dim, size, dim, beta, options)
    n, dropout = config.n_codebooks, config.quantizer_dropout
    return ResidualVQ(latent_dim, size, n, dim, beta, options, dropout)


def _check_vq_config(config: BottleneckConfig) -> None:
    if config.kind == "vq" and config.n_codebooks != 1:
        raise VqkitError(
            f"bottleneck.kind 'vq' has one codebook, got n_codebooks = {config.n_codebooks}; "
            "use kind 'rvq' for several"
        )
    if config.codebook_size < 2 or config.n_codebooks < 1 or config.codebook_dim < 0:
        raise VqkitError(
            "bottleneck needs codebook_size >= 2, n_codebooks >= 1 and codebook_dim >= 0"
        )
    if not 0 <= config.decay < 1 or not 0 <= config.quantizer_dropout <= 1:
        raise VqkitError("bottleneck.decay must be in [0, 1) and quantizer_dropout in [0, 1]")
