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
from vqkit.audio.synthesis import Frames

BRIDGE_PACKETS = 5  # losses this short are bridged when the packet after them has arrived
HOLD_PACKETS = 1  # lost packets whose envelope and voicing are the last ones, unchanged
FADE_PACKETS = 3  # lost packets over which voicing and level fade to the comfort noise
BACKGROUND_RISE_DB = 0.05  # per frame: how fast the background estimate follows a rising floor


class Concealer:
    """Tracks the last decoded frame and the background; fills lost packets.

    Frames carry the envelope in dB and, for the harmonic synthesiser, F0 (Hz) and voicing;
    other feature kinds are concealed as the envelope alone (their level fades to the background
    the same way).
    """

    def __init__(self, downsample: int) -> None:
        self.downsample = downsample
        self.last: Frames | None = None  # the last frame that arrived (one frame)
        self.background: Tensor | None = None  # per band, dB
        self.n_lost = 0  # frames concealed since the last one that arrived

    def __call__(self, window: Frames, lost: list[bool], start: int, stop: int) -> Frames:
        """The frames of packets ``[start, stop)`` of a decoded window of ``len(lost) * d``
        unbatched frames (``lost`` flags each of its packets), lost packets' frames replaced."""
        d, parts = self.downsample, []
        for i in range(start, stop):
            if not lost[i]:
                parts.append(window[i * d : (i + 1) * d])
                self._observe(parts[-1])
                continue
            after = next((k for k in range(i, len(lost)) if not lost[k]), None)
            run = None if after is None else after - i + self.n_lost // d  # packets in the loss
            if run is not None and run <= BRIDGE_PACKETS and self.last is not None:
                parts.append(self._bridge(window[after * d : after * d + 1], run * d))
            else:
                parts.append(self._extrapolate(d, window))
        return Frames.cat(parts)

    def _observe(self, frames: Frames) -> None:
        envelope = frames.features
        for n in range(frames.n_frames):
            if self.background is None:
                self.background = envelope[:, n].clone()
            self.background = torch.minimum(self.background + BACKGROUND_RISE_DB, envelope[:, n])
        self.last, self.n_lost = frames[-1:], 0

    def _bridge(self, following: Frames, gap: int) -> Frames:
        """The next ``downsample`` frames of a ``gap``-frame loss between :attr:`last` and the
        frame ``following`` it: linear in dB, log-F0 and voicing."""
        d, last = self.downsample, self.last
        w = ((self.n_lost + torch.arange(1, d + 1)) / (gap + 1))[None]  # (1, d)
        self.n_lost += d
        features = last.features + w * (following.features - last.features)
        if last.f0 is None:
            return Frames(features)
        f0 = torch.exp(torch.log(last.f0) + w[0] * torch.log(following.f0 / last.f0))
        return Frames(features, f0, last.voiced + w[0] * (following.voiced - last.voiced))

    def _extrapolate(self, n: int, like: Frames) -> Frames:
        """The next ``n`` frames of a loss no arrived frame ends; ``like`` has their layout."""
        parametric = like.f0 is not None
        if self.last is None:  # nothing arrived yet: silence
            features = torch.full((like.features.shape[0], n), ENV_FLOOR_DB)
            if not parametric:
                return Frames(features)
            return Frames(features, torch.full((n,), UNVOICED_F0), torch.zeros(n))
        d, last = self.downsample, self.last
        k = self.n_lost + torch.arange(1, n + 1)  # how many frames into the loss
        fade = ((k - HOLD_PACKETS * d) / (FADE_PACKETS * d)).clamp(0, 1)  # 0 held .. 1 comfort
        self.n_lost += n
        envelope = last.features.expand(-1, n)
        features = envelope + fade * (self.background[:, None] - envelope)
        if not parametric:
            return Frames(features)
        return Frames(features, last.f0.expand(n).clone(), last.voiced.expand(n) * (1 - fade))
