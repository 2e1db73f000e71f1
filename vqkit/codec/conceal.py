"""Packet-loss concealment for the parametric codec, in the decoded parameters.

A lost packet's frames are made from the last frames that arrived: the pitch held, the envelope
held through the first lost packet, then over :data:`FADE_PACKETS` more packets the voicing fades
to none and the envelope glides (in dB, so the level falls smoothly) to the background, an
estimate of the noise floor kept from the frames that arrived (each band's running minimum,
rising slowly): what is left after a long loss is comfort noise at the background's level. The
synthesiser interpolates every parameter between frames, so neither the loss nor the recovery
clicks. A stream lost from its start is concealed by silence (the envelope floor).
"""

from __future__ import annotations

import torch
from torch import Tensor

from vqkit.audio.envelope import ENV_FLOOR_DB, UNVOICED_F0

HOLD_PACKETS = 1  # lost packets whose envelope and voicing are the last ones, unchanged
FADE_PACKETS = 3  # lost packets over which voicing and level fade to the comfort noise
BACKGROUND_RISE_DB = 0.05  # per frame: how fast the background estimate follows a rising floor


class Concealer:
    """Tracks the last decoded frame and the background; fills lost packets.

    Features are ``(K + 2, N)``: the envelope in dB, then F0 (Hz) and voicing, as the harmonic
    synthesiser takes them; other feature kinds are concealed as the envelope rows alone (their
    level fades to the background the same way).
    """

    def __init__(self, downsample: int, parametric: bool = True) -> None:
        self.downsample, self.parametric = downsample, parametric
        self.last: Tensor | None = None  # the last frame that arrived (K + 2,)
        self.background: Tensor | None = None  # per band, dB
        self.n_lost = 0  # frames concealed since the last one that arrived

    def __call__(self, features: Tensor, lost: list[bool]) -> Tensor:
        """Features ``(F, len(lost) * downsample)`` of consecutive packets with the lost
        packets' frames replaced."""
        d = self.downsample
        if not any(lost):
            self._observe(features)
            return features
        out = features.clone()
        for i, gone in enumerate(lost):
            frames = slice(i * d, (i + 1) * d)
            if gone:
                out[:, frames] = self._conceal(d, features.shape[0])
            else:
                self._observe(features[:, frames])
        return out

    def _observe(self, frames: Tensor) -> None:
        envelope = frames[:-2] if self.parametric else frames
        for n in range(frames.shape[-1]):
            if self.background is None:
                self.background = envelope[:, n].clone()
            self.background = torch.minimum(self.background + BACKGROUND_RISE_DB, envelope[:, n])
        self.last, self.n_lost = frames[:, -1].clone(), 0

    def _conceal(self, n: int, rows: int) -> Tensor:
        if self.last is None:  # nothing arrived yet: silence
            out = torch.full((rows, n), ENV_FLOOR_DB)
            if self.parametric:
                out[-2:] = torch.tensor([UNVOICED_F0, 0.0])[:, None]
            return out
        d = self.downsample
        k = self.n_lost + torch.arange(1, n + 1)  # how many frames into the loss
        fade = ((k - HOLD_PACKETS * d) / (FADE_PACKETS * d)).clamp(0, 1)  # 0 held .. 1 comfort
        self.n_lost += n
        out = self.last[:, None].expand(rows, n).clone()
        envelope_rows = slice(0, rows - 2) if self.parametric else slice(0, rows)
        envelope = out[envelope_rows]
        out[envelope_rows] = envelope + fade * (self.background[:, None] - envelope)
        if self.parametric:  # F0 held, voicing faded
            out[-1] = out[-1] * (1 - fade)
        return out
