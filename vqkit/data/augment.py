"""Random recording channels for training: the same speech as another microphone, room treatment
or telephone line would give it, applied to dB spectral features (``features.kind`` stft, mel,
ratek or envelope) before they are normalised.

A channel is a gain per feature row, the same for every frame of a segment: a level change, a
spectral tilt, a smooth random EQ (a few cosines over the rows) and, for some segments, a low-pass
that rolls the top rows off. Values at the item's floor (digital silence) stay there, so a channel
never invents a noise floor. A codec reproduces what it is given, so training feeds the model the
channel's output as both input and target: the model learns to code spectra it will meet on other
microphones, rather than to undo the channel.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

LEVEL_DB = 6.0  # level change, uniform in +-this
TILT_DB = 8.0  # difference between the top and the bottom row, uniform in +-this
EQ_DB = 6.0  # the EQ curve's cosines together reach at most this
EQ_TERMS = 3  # cosines of the EQ curve: half a period over the rows up to this many
LOWPASS_SHARE = 0.25  # share of channels that also low-pass
LOWPASS_CUTOFF = (0.6, 0.95)  # where the roll-off starts, as a fraction of the rows
LOWPASS_DB_PER_ROW = 12.0


def channel_gain(n_rows: int, rng: np.random.Generator) -> np.ndarray:
    """A random channel's gain in dB for each of ``n_rows`` feature rows, lowest first: ``(F,)``."""
    rows = np.linspace(0.0, 1.0, n_rows)
    gain = rng.uniform(-LEVEL_DB, LEVEL_DB) + rng.uniform(-TILT_DB, TILT_DB) * (rows - 0.5)
    for k in range(1, EQ_TERMS + 1):
        phase = rng.uniform(0.0, 2 * np.pi)
        gain += rng.uniform(-1.0, 1.0) * EQ_DB / EQ_TERMS * np.cos(np.pi * k * rows + phase)
    if rng.random() < LOWPASS_SHARE:
        cutoff = rng.uniform(*LOWPASS_CUTOFF) * (n_rows - 1)
        gain -= LOWPASS_DB_PER_ROW * np.clip(np.arange(n_rows) - cutoff, 0.0, None)
    return gain


def through_channel(x: Tensor, gain: np.ndarray, floor_db: float) -> Tensor:
    """dB features ``x`` ``(F, N)`` through the channel ``gain`` ``(F,)``: ``(F, N)``, never below
    ``floor_db``, and values at the floor left there."""
    y = torch.clamp(x + torch.from_numpy(gain).to(x.dtype)[:, None], min=floor_db)
    return torch.where(x <= floor_db, x, y)
