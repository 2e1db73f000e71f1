"""Packet-loss concealment for the parametric codec, in the decoded parameters.

The decoder holds back a few packets for its network's lookahead, so when a lost packet's frames
are made the packets after it have often arrived. A loss of at most :data:`BRIDGE_PACKETS`
packets whose next packet is there is bridged: envelope (in dB), log-F0 and voicing interpolated
from the last frame before it to the first after it. Otherwise the loss is extrapolated from the
last frames that arrived: the pitch held, the envelope and voicing held through the first lost
packet, then over :data:`FADE_PACKETS` more packets the voicing fades to none and the envelope
glides (in dB, so the level falls smoothly) to the background, an estimate of the noise floor
kept from the frames that arrived (each band's running minimum, rising slowly): after a long
loss what is left is comfort noise at the background's level. The synthesiser interpolates every
parameter between frames, so neither the loss nor the recovery clicks. A stream lost from its
start is concealed by silence (the envelope floor).
"""

from __future__ import annotations

import torch
from torch import Tensor

from vqkit.audio.envelope import ENV_FLOOR_DB, UNVOICED_F0

BRIDGE_PACKETS = 5  # losses this short are bridged when the packet after them has arrived
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

    def __call__(self, window: Tensor, lost: list[bool], start: int, stop: int) -> Tensor:
        """The frames of packets ``[start, stop)`` of a decoded window ``(F, len(lost) * d)``
        (``lost`` flags each of its packets), lost packets' frames replaced."""
        d = self.downsample
        out = window[:, start * d : stop * d].clone()
        for i in range(start, stop):
            frames = slice((i - start) * d, (i - start + 1) * d)
            if not lost[i]:
                self._observe(window[:, i * d : (i + 1) * d])
                continue
            after = next((k for k in range(i, len(lost)) if not lost[k]), None)
            run = None if after is None else after - i + self.n_lost // d  # packets in the loss
            if run is not None and run <= BRIDGE_PACKETS and self.last is not None:
                out[:, frames] = self._bridge(window[:, after * d], run * d)
            else:
                out[:, frames] = self._extrapolate(d, window.shape[0])
        return out

    def _observe(self, frames: Tensor) -> None:
        envelope = frames[:-2] if self.parametric else frames
        for n in range(frames.shape[-1]):
            if self.background is None:
                self.background = envelope[:, n].clone()
            self.background = torch.minimum(self.background + BACKGROUND_RISE_DB, envelope[:, n])
        self.last, self.n_lost = frames[:, -1].clone(), 0

    def _bridge(self, following: Tensor, gap: int) -> Tensor:
        """The next ``downsample`` frames of a ``gap``-frame loss between :attr:`last` and the
        frame ``following`` it ``(F,)``: linear in dB, log-F0 and voicing."""
        d = self.downsample
        w = ((self.n_lost + torch.arange(1, d + 1)) / (gap + 1))[None]  # (1, d)
        self.n_lost += d
        last, following = self.last[:, None], following[:, None]
        out = last + w * (following - last)
        if self.parametric:
            out[-2] = torch.exp(torch.log(last[-2]) + w[0] * torch.log(following[-2] / last[-2]))
        return out

    def _extrapolate(self, n: int, rows: int) -> Tensor:
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
