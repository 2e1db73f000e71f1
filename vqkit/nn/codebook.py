"""One codebook: nearest-code search, EMA updates, k-means initialisation, dead-code re-seeding.

The codebook works on flat rows ``(M, codebook_dim)``; :mod:`vqkit.nn.bottleneck` wraps it with the
projections, losses and the straight-through estimator. Its state lives in buffers (the vectors
are an ``nn.Parameter`` only when they are learned by a codebook loss instead of EMA), so a
checkpoint restores it exactly. Under ``torch.distributed`` every statistic that changes the
codebook is all-reduced, and every random choice is made on rank 0 and broadcast, so replicas
never diverge.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

SEARCH_CHUNK = 4096  # rows per distance matrix: bounds memory, and a cache-sized block is faster
EPS = 1e-5  # Laplace smoothing of the EMA cluster sizes


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum ``x`` in place over all ranks (a no-op outside ``torch.distributed``)."""
    if _distributed():
        dist.all_reduce(x)
    return x


def broadcast(x: Tensor) -> Tensor:
    """Overwrite ``x`` in place with rank 0's value (a no-op outside ``torch.distributed``)."""
    if _distributed():
        dist.broadcast(x, src=0)
    return x


def nearest(x: Tensor, codebook: Tensor) -> Tensor:
    """Index of the nearest code (squared Euclidean) for each row: ``(M, d), (K, d) -> (M,)``.

    Searched in chunks of :data:`SEARCH_CHUNK` rows, so memory stays bounded.
    """
    return torch.cat([nearest_rows(rows, codebook) for rows in x.split(SEARCH_CHUNK)])


def nearest_rows(x: Tensor, codebook: Tensor) -> Tensor:
    """:func:`nearest` in one piece (plain tensor code, so exported modules use it as it is).

    ``|x|^2`` is the same for every code, so ``|c|^2 - 2 x.c`` (one ``addmm``) orders them.
    """
    norms = codebook.pow(2).sum(1)
    return torch.addmm(norms, x, codebook.t(), alpha=-2.0).argmin(1)


def sample_rows(x: Tensor, n: int) -> Tensor:
    """``n`` random rows of ``x`` (without replacement when there are enough), same on all ranks."""
    if x.shape[0] >= n:
        index = torch.randperm(x.shape[0], device=x.device)[:n]
    else:
        index = torch.randint(x.shape[0], (n,), device=x.device)
    return broadcast(x[index].contiguous())


def kmeans_plus_plus(x: Tensor, k: int) -> Tensor:
    """k-means++ seeds: ``k`` rows of ``x`` ``(M, d)``, each drawn with probability proportional
    to its squared distance from the seeds so far (rank 0's choice under ``torch.distributed``).

    With fewer than ``k`` distinct rows the rest are drawn at random, with replacement.
    """
    norms = x.pow(2).sum(1)

    def distance(row: int) -> Tensor:  # |x - x_row|^2 for every row, by one matrix-vector product
        return torch.addmv(norms + norms[row], x, x[row], alpha=-2).clamp_(min=0)

    index = torch.empty(k, dtype=torch.long, device=x.device)
    index[0] = torch.randint(x.shape[0], ())
    closest = distance(int(index[0]))
    for i in range(1, k):
        total = closest.sum()
        if total <= 0:  # every row is already a seed
            index[i:] = torch.randint(x.shape[0], (k - i,), device=x.device)
            break
        index[i] = torch.multinomial(closest / total, 1)[0]
        closest = torch.minimum(closest, distance(int(index[i])))
    return broadcast(x[index].contiguous())


def kmeans(x: Tensor, k: int, iters: int, l2_normalize: bool = False) -> Tensor:
    """Lloyd's k-means of the rows of ``x`` ``(M, d)`` into ``k`` centroids ``(k, d)``, seeded by
    k-means++.

    Sums and counts are all-reduced, so under ``torch.distributed`` every rank clusters the
    union of all ranks' rows and gets the same centroids. Empty clusters keep their centroid.
    """
    centroids = kmeans_plus_plus(x, k)
    if l2_normalize:
        centroids = F.normalize(centroids, dim=1)
    for _ in range(iters):
        codes = nearest(x, centroids)
        sums = all_reduce_sum(torch.zeros_like(centroids).index_add_(0, codes, x))
        counts = all_reduce_sum(torch.bincount(codes, minlength=k).to(x.dtype))
        means = sums / counts.clamp(min=1).unsqueeze(1)
        centroids = torch.where(counts.unsqueeze(1) > 0, means, centroids)
        if l2_normalize:
            centroids = F.normalize(centroids, dim=1)
    return centroids


@dataclass(frozen=True)
class CodebookOptions:
    """How a codebook learns (mirrors the keys of :class:`vqkit.config.BottleneckConfig`)."""

    ema: bool = True  # EMA updates instead of a codebook loss
    decay: float = 0.99  # EMA decay
    kmeans_init: bool = True  # initialise from the first training batch by k-means
    kmeans_iters: int = 10
    dead_threshold: float = 2.0  # codes used fewer times than this per window are re-seeded
    dead_window: int = 100  # training batches per dead-code window; 0 disables re-seeding
    l2_normalize: bool = False  # search and store l2-normalised vectors


class Codebook(nn.Module):
    """``codebook_size`` vectors of ``dim`` values with their learning state.

    Buffers: ``initialised`` (k-means done), ``usage`` (counts in the current dead-code window,
    over all ranks),
    ``steps`` (training batches in the window), and with EMA ``cluster_size`` and ``embed_sum``.
    """

    def __init__(self, codebook_size: int, dim: int, options: CodebookOptions) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.options = options
        vectors = torch.empty(codebook_size, dim).uniform_(-1 / codebook_size, 1 / codebook_size)
        if options.l2_normalize:
            vectors = F.normalize(vectors, dim=1)
        if options.ema:
            self.register_buffer("vectors", vectors)
            self.register_buffer("cluster_size", torch.ones(codebook_size))
            self.register_buffer("embed_sum", vectors.clone())
        else:
            self.vectors = nn.Parameter(vectors)
        self.register_buffer("initialised", torch.tensor(not options.kmeans_init))
        self.register_buffer("usage", torch.zeros(codebook_size))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def search(self, x: Tensor) -> Tensor:
        """Nearest codes of the rows of ``x``: ``(M, dim) -> (M,)`` int64."""
        return nearest(x.detach().to(self.vectors.dtype), self.vectors.detach())

    def lookup(self, codes: Tensor) -> Tensor:
        """Code vectors: ``(...) -> (..., dim)`` (differentiable in the vectors without EMA)."""
        return F.embedding(codes, self.vectors)

    @torch.no_grad()
    def initialise(self, x: Tensor) -> None:
        """k-means initialisation from ``x`` ``(M, dim)``, once (training only)."""
        if bool(self.initialised):
            return
        options = self.options
        centroids = kmeans(
            x.float(), self.codebook_size, options.kmeans_iters, options.l2_normalize
        )
        self._set_codes(torch.arange(self.codebook_size, device=x.device), centroids)
        self.initialised.fill_(True)

    @torch.no_grad()
    def update(self, x: Tensor, codes: Tensor) -> None:
        """One training step: EMA update and dead-code bookkeeping from rows ``x`` and ``codes``."""
        x = x.detach().to(self.usage.dtype)
        # summed over ranks, so every buffer stays identical on every replica
        counts = all_reduce_sum(torch.bincount(codes, minlength=self.codebook_size).to(x.dtype))
        if self.options.ema:
            sums = torch.zeros_like(self.embed_sum).index_add_(0, codes, x)
            self._ema_step(counts, all_reduce_sum(sums))
        self.usage += counts
        self.steps += 1
        if self.options.dead_window and int(self.steps) >= self.options.dead_window:
            self.reseed_dead(x)

    def _ema_step(self, counts: Tensor, sums: Tensor) -> None:
        decay = self.options.decay
        self.cluster_size.lerp_(counts, 1 - decay)
        self.embed_sum.lerp_(sums, 1 - decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + EPS) / (total + self.codebook_size * EPS) * total
        vectors = self.embed_sum / smoothed.unsqueeze(1)
        if self.options.l2_normalize:
            vectors = F.normalize(vectors, dim=1)
        self.vectors.copy_(vectors)

    @torch.no_grad()
    def restart(self) -> None:
        """Begin the learning state afresh from the vectors as they are (fine-tuning a trained
        model): EMA sums, usage and the dead-code window."""
        every = torch.arange(self.codebook_size, device=self.vectors.device)
        self._set_codes(every, self.vectors.detach().clone())
        self.usage.zero_()
        self.steps.zero_()

    @torch.no_grad()
    def reseed_dead(self, x: Tensor) -> int:
        """Replace codes used fewer than ``dead_threshold`` times this window by rows of ``x``.

        Ends the window (usage and step count start again). Returns how many were replaced.
        """
        dead = torch.nonzero(self.usage < self.options.dead_threshold).squeeze(1)
        if len(dead):
            self._set_codes(dead, sample_rows(x.detach().to(self.usage.dtype), len(dead)))
        self.usage.zero_()
        self.steps.zero_()
        return len(dead)

    def _set_codes(self, index: Tensor, vectors: Tensor) -> None:
        if self.options.l2_normalize:
            vectors = F.normalize(vectors, dim=1)
        self.vectors.data[index] = vectors.to(self.vectors.dtype)
        if self.options.ema:
            # a fresh code counts as one vector seen, so the next EMA step moves it gently
            self.cluster_size[index] = 1.0
            self.embed_sum[index] = vectors.to(self.embed_sum.dtype)


def code_counts(codes: Tensor, codebook_size: int) -> Tensor:
    """How often each code of each stage occurs: codes ``(B, Q, ...)`` (e.g. ``(B, Q, N)`` or
    ``(B, Q, H, W)``) or ``(Q, N)`` -> ``(Q, K)`` counts (``K = codebook_size``), on the CPU.
    The one code count of vqkit: the bottlenecks' batch statistics, validation, the bench and
    the teaching tools all use it."""
    if codes.dim() == 2:
        codes = codes[None]
    if codes.dim() < 3:
        raise ValueError(f"expected codes (B, Q, ...) or (Q, N), got {tuple(codes.shape)}")
    per_stage = codes.transpose(0, 1).reshape(codes.shape[1], -1).long()
    if per_stage.numel() and (per_stage.min() < 0 or per_stage.max() >= codebook_size):
        raise ValueError(f"codes outside 0..{codebook_size - 1}")
    return torch.stack([torch.bincount(c, minlength=codebook_size) for c in per_stage]).cpu()


def usage_and_perplexity(counts: Tensor) -> tuple[Tensor, Tensor]:
    """Per stage of ``counts`` ``(Q, K)``: the fraction of codes used at least once and the
    perplexity (exp of the entropy of the code frequencies; K when all are used equally, 1 when
    one code is), both ``(Q,)`` float64."""
    counts = counts.double()
    p = counts / counts.sum(-1, keepdim=True).clamp(min=1)
    entropy = -(p * p.clamp(min=1e-300).log()).sum(-1)
    return (counts > 0).double().mean(-1), entropy.exp()


def code_stats(counts: Tensor, first_stage: int = 0) -> dict[str, float]:
    """``usage/q`` and ``perplexity/q`` for each stage ``q`` of ``counts`` ``(Q, K)``, numbered
    from ``first_stage``."""
    usage, perplexity = usage_and_perplexity(counts)
    stats: dict[str, float] = {}
    for q, (u, p) in enumerate(zip(usage.tolist(), perplexity.tolist(), strict=True)):
        stats[f"usage/{q + first_stage}"] = u
        stats[f"perplexity/{q + first_stage}"] = p
    return stats
