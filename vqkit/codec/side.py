"""The side codes of a parametric codec's code frames: pitch and voicing, carried in the ``.vqc``
before the envelope stages and counted in every bitrate.

Two codings, chosen by ``codec.side_coding`` when encoding; a file's rows say which one it holds
(their codebook sizes differ), so every file decodes whatever the setting:

- ``separate`` (18 bits per 40 ms code frame): a 7-bit log-F0 code every 20 ms and one voicing bit
  per 10 ms frame (:func:`pitch_codes`).
- ``joint`` (11 bits per 40 ms): one code per code frame for the voicing pattern, log-F0 and its
  slope, as LPCNet codes pitch, slope and voicing together (:mod:`vqkit.codec.joint`). It frees
  the bits of a fourth envelope stage under 1.3 kbit/s.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from vqkit.audio.envelope import UNVOICED_F0, fill_unvoiced, interp
from vqkit.audio.pitch import F0_MAX, F0_MIN
from vqkit.codec import joint
from vqkit.errors import VqkitError

SIDE_CODINGS = ("separate", "joint")

PITCH_BITS = 7  # a log-F0 code on a uniform grid from F0_MIN to F0_MAX
PITCH_SHARE = 2  # frames per log-F0 code (20 ms at a 10 ms hop)


def side_codebooks(factor: int, coding: str = "separate") -> tuple[int, ...]:
    """Codebook sizes of the side codes of a code frame of ``factor`` frames. ``separate``: a
    log-F0 code for every :data:`PITCH_SHARE` frames, then one voicing bit per frame in one code;
    ``joint``: one code (:func:`vqkit.codec.joint.codebook_size`)."""
    if coding not in SIDE_CODINGS:
        raise VqkitError(f"unknown codec.side_coding '{coding}'; valid: {', '.join(SIDE_CODINGS)}")
    if factor % PITCH_SHARE or not 1 <= factor <= 16:
        raise VqkitError(
            f"the parametric codec needs model.downsample in 2..16 divisible by {PITCH_SHARE}, "
            f"got {factor}"
        )
    if coding == "joint":
        return (joint.codebook_size(factor),)
    return (2**PITCH_BITS,) * (factor // PITCH_SHARE) + (2**factor,)


def side_coding_of(codebook_sizes: tuple[int, ...], factor: int) -> str | None:
    """The coding whose side rows begin ``codebook_sizes`` (a file's rows), or None."""
    for coding in SIDE_CODINGS:
        side = side_codebooks(factor, coding)
        if tuple(codebook_sizes[: len(side)]) == side:
            return coding
    return None


def side_codes(f0: Tensor, voiced: Tensor, factor: int, coding: str) -> Tensor:
    """Side codes ``(B, C, N')`` of F0 (Hz) and voicing ``(B, N)`` in ``coding``."""
    if coding == "joint":
        return joint.encode(f0, voiced, factor)
    return pitch_codes(f0, voiced, factor)


def side_from_codes(
    codes: Tensor, factor: int, n_frames: int, coding: str, causal: bool = False
) -> tuple[Tensor, Tensor]:
    """F0 (Hz) and voicing ``(B, n_frames)`` from side codes ``(B, C, N')`` in ``coding``.
    ``causal``: a code frame's F0 depends on no later code frame, so that a decoder that waits
    for no packet (a causal model's stream) decodes exactly what a file decodes."""
    if coding == "joint":
        return joint.decode(codes, factor, n_frames, causal)
    return pitch_from_codes(codes, factor, n_frames, causal)


def pitch_codes(f0: Tensor, voiced: Tensor, factor: int) -> Tensor:
    """Pitch and voicing codes ``(B, C, N')`` of F0 (Hz) and voicing ``(B, N)``
    for code frames of ``factor`` frames (see :func:`side_codebooks`). A log-F0 code is the mean
    log-F0 of the voiced frames in its share (0 when none is voiced, as the decoder ignores it);
    the voicing bits go first frame first, most significant bit first. Each code frame's codes
    depend on its own frames only."""
    n, share = f0.shape[-1], PITCH_SHARE
    pad = -n % factor
    f0 = F.pad(f0, (0, pad), value=UNVOICED_F0).unflatten(-1, (-1, factor // share, share))
    voiced = F.pad(voiced, (0, pad)).unflatten(-1, (-1, factor // share, share))
    count = voiced.sum(-1)  # (B, N', factor // share)
    log_f0 = (torch.log(f0) * voiced).sum(-1) / count.clamp(min=1)
    levels = 2**PITCH_BITS - 1
    span = math.log(F0_MAX / F0_MIN)
    pitch = torch.round((log_f0 - math.log(F0_MIN)) / span * levels).clamp(0, levels).long()
    pitch = torch.where(count > 0, pitch, 0)
    weights = 2 ** torch.arange(factor - 1, -1, -1)
    bits = (voiced.flatten(-2).long() * weights).sum(-1, keepdim=True)
    return torch.cat([pitch, bits], -1).transpose(1, 2)


def pitch_from_codes(
    codes: Tensor, factor: int, n_frames: int, causal: bool = False
) -> tuple[Tensor, Tensor]:
    """F0 (Hz) and voicing ``(B, n_frames)`` from :func:`pitch_codes`: each log-F0 code sits at
    the centre of its share of frames and F0 is interpolated linearly in log between them; shares
    with no voiced frame take it from their voiced neighbours (:func:`fill_unvoiced`). ``causal``
    holds the frames after a code frame's last centre there, and fills from its own code frame
    and the past only."""
    share = PITCH_SHARE
    shifts = torch.arange(factor - 1, -1, -1)
    voiced = ((codes[:, -1, :, None] >> shifts) & 1).flatten(1).float()  # (B, N' * factor)
    span = math.log(F0_MAX / F0_MIN)
    log_f0 = (
        math.log(F0_MIN)
        + codes[:, :-1].transpose(1, 2).flatten(1).float() / (2**PITCH_BITS - 1) * span
    )  # (B, M) with M = N' * factor // share
    has_voice = voiced.unflatten(-1, (-1, share)).amax(-1)
    f0 = fill_unvoiced(torch.exp(log_f0), has_voice, factor // share if causal else 0)
    centres = torch.arange(f0.shape[-1]) * share + (share - 1) / 2
    frames = torch.arange(n_frames, dtype=centres.dtype)
    if causal:  # past the last centre of its code frame: that centre's value, not the next's
        last = (torch.arange(n_frames) // factor + 1) * (factor // share) - 1  # its index
        frames = torch.minimum(frames, centres[last.clamp(max=len(centres) - 1)])
    f0 = torch.exp(interp(centres, torch.log(f0), frames.expand(f0.shape[0], -1)))
    return f0, voiced[:, :n_frames]
