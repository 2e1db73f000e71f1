"""The ``joint`` side coding: one code per code frame of ``d`` frames for voicing, pitch and
pitch slope (LPCNet codes pitch, slope and voicing in 11 bits per 40 ms; so does this, at d = 4).

Voicing is one of ``2d`` patterns: no frame voiced, all voiced, voiced from frame ``i`` on (an
onset) or up to frame ``i`` (an offset), ``i = 1..d-1``; other patterns take the nearest one (the
analysis' 3-frame median leaves few). log-F0 over the voiced frames is fitted by a straight line in
the frame index (least squares), coded as its value at the code frame's centre and its slope.
Frames that are all voiced, most of the voiced ones, get a fine grid (:data:`PITCH_BITS` and
:data:`SLOPES`); frames with an onset or offset a coarse one. The code is::

    0                                      no voiced frame
    1 + p * SLOPES + s                     all voiced: pitch p < 2^PITCH_BITS, slope s < SLOPES
    1 + 2^PITCH_BITS * SLOPES              onset or offset pattern k < 2d - 2,
      + (k * 2^EDGE_PITCH_BITS + p) * 2 + s   pitch p < 2^EDGE_PITCH_BITS, slope s < 2

Each code frame's code depends on its own frames only, so chunked encoding stays exact.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from vqkit.audio.envelope import UNVOICED_F0, fill_unvoiced
from vqkit.audio.pitch import F0_MAX, F0_MIN

PITCH_BITS = 7  # log-F0 of an all-voiced code frame: 31-cent steps from F0_MIN to F0_MAX
SLOPES = 12  # slopes of an all-voiced code frame, denser near 0 (see _slopes)
MAX_SLOPE = 0.12  # natural-log F0 change per frame of the steepest slope (2 semitones per 10 ms)
EDGE_PITCH_BITS = 5  # log-F0 of a code frame with an onset or offset
EDGE_SLOPE = 0.04  # its two slopes are +-this


def codebook_size(factor: int) -> int:
    """Codes of a code frame of ``factor`` frames (1,921 at 4: 11 bits)."""
    return 1 + 2**PITCH_BITS * SLOPES + (2 * factor - 2) * 2**EDGE_PITCH_BITS * 2


def patterns(factor: int) -> Tensor:
    """The voicing patterns ``(2 * factor, factor)`` of 0/1: none, all, onsets, offsets."""
    rows = [[0] * factor, [1] * factor]
    rows += [[int(j >= i) for j in range(factor)] for i in range(1, factor)]
    rows += [[int(j < i) for j in range(factor)] for i in range(1, factor)]
    return torch.tensor(rows, dtype=torch.float32)


def _slopes(edge: bool) -> Tensor:
    """The slope grid: two slopes at an edge; else SLOPES of them, quadratically denser near 0
    (pitch glides are mostly gentle, octave jumps steep)."""
    if edge:
        return torch.tensor([-EDGE_SLOPE, EDGE_SLOPE])
    u = torch.linspace(-1, 1, SLOPES)
    return MAX_SLOPE * u.sign() * u.square()


def _to_grid(log_f0: Tensor, bits: int) -> Tensor:
    levels = 2**bits - 1
    span = math.log(F0_MAX / F0_MIN)
    return torch.round((log_f0 - math.log(F0_MIN)) / span * levels).clamp(0, levels).long()


def _from_grid(index: Tensor, levels: Tensor) -> Tensor:
    return math.log(F0_MIN) + index.float() / levels * math.log(F0_MAX / F0_MIN)


def encode(f0: Tensor, voiced: Tensor, factor: int) -> Tensor:
    """Joint codes ``(B, 1, N')`` of F0 (Hz) and voicing ``(B, N)``, ``N' = ceil(N / factor)``."""
    pad = -f0.shape[-1] % factor
    f0 = F.pad(f0, (0, pad), value=UNVOICED_F0).unflatten(-1, (-1, factor))  # (B, N', d)
    voiced = F.pad(voiced, (0, pad)).unflatten(-1, (-1, factor))
    pattern = (voiced[..., None, :] - patterns(factor)).abs().sum(-1).argmin(-1)  # (B, N')
    t = torch.arange(factor) - (factor - 1) / 2  # frame position about the centre
    count = voiced.sum(-1).clamp(min=1)
    mean_t = (voiced * t).sum(-1) / count
    mean_log = (voiced * torch.log(f0)).sum(-1) / count
    centred = voiced * (t - mean_t[..., None])
    spread = (centred * (t - mean_t[..., None])).sum(-1)
    fitted = (centred * torch.log(f0)).sum(-1) / spread.clamp(min=1e-9)
    slope = torch.where(spread > 0, fitted, 0.0)  # one voiced frame: flat
    codes = torch.zeros_like(pattern)
    for edge, bits in ((False, PITCH_BITS), (True, EDGE_PITCH_BITS)):
        grid = _slopes(edge)
        s = (slope[..., None] - grid).abs().argmin(-1)
        p = _to_grid(mean_log - grid[s] * mean_t, bits)  # the line's value at the centre
        if edge:
            code = 1 + 2**PITCH_BITS * SLOPES + ((pattern - 2).clamp(min=0) * 2**bits + p) * 2 + s
            codes = torch.where(pattern >= 2, code, codes)
        else:
            codes = torch.where(pattern == 1, 1 + p * SLOPES + s, codes)
    return codes[:, None]


def decode(
    codes: Tensor, factor: int, n_frames: int, causal: bool = False
) -> tuple[Tensor, Tensor]:
    """F0 (Hz) and voicing ``(B, n_frames)`` from :func:`encode`'s codes ``(B, 1, N')``: each
    voiced code frame's line, unvoiced stretches filled from their voiced neighbours, the track
    smoothed over 3 frames. ``causal``: filled from its own code frame and the past only, and a
    code frame's last frame left unsmoothed (smoothing it would need the next code frame)."""
    code = codes[:, 0].long()
    steady = (code >= 1) & (code < 1 + 2**PITCH_BITS * SLOPES)
    rest = (code - 1).clamp(min=0)
    edge_rest = (code - 1 - 2**PITCH_BITS * SLOPES).clamp(min=0)
    edge_pattern, edge = edge_rest // (2 * 2**EDGE_PITCH_BITS), edge_rest % (2 * 2**EDGE_PITCH_BITS)
    pattern = torch.where(steady, 1, torch.where(code > 0, 2 + edge_pattern, 0))
    log_f0 = torch.where(
        steady,
        _from_grid(rest // SLOPES, torch.tensor(2**PITCH_BITS - 1)),
        _from_grid(edge // 2, torch.tensor(2**EDGE_PITCH_BITS - 1)),
    )
    slope = torch.where(steady, _slopes(False)[rest % SLOPES], _slopes(True)[edge % 2])
    t = torch.arange(factor) - (factor - 1) / 2
    f0 = torch.exp(log_f0[..., None] + slope[..., None] * t).flatten(1)  # (B, N' * d)
    has_pitch = (pattern > 0)[..., None].expand(-1, -1, factor).flatten(1).float()
    log_f0 = torch.log(fill_unvoiced(f0, has_pitch, factor if causal else 0))
    # the lines of neighbouring code frames meet with a step; a [1/4, 1/2, 1/4] smoothing eases it
    # (+0.06 PESQ-NB on 8 kHz speech at 11 stages, neutral at 4: benchmarks/RESULTS.md)
    padded = F.pad(log_f0[:, None], (1, 1), mode="replicate")[:, 0]
    log_f0 = 0.25 * padded[:, :-2] + 0.5 * padded[:, 1:-1] + 0.25 * padded[:, 2:]
    if causal:  # a code frame's last frame waits for no later code frame: left on its line
        ends = (torch.arange(log_f0.shape[-1]) + 1) % factor == 0
        log_f0 = torch.where(ends, padded[:, 1:-1], log_f0)
    f0 = torch.exp(log_f0)
    voiced = patterns(factor)[pattern].flatten(1)
    return f0[:, :n_frames], voiced[:, :n_frames]
