"""Random recording channels for training: the same speech as another microphone, room treatment
or telephone line would give it, applied to dB spectral features (``features.kind`` stft, mel,
ratek or envelope) before they are normalised.

A channel is a gain per feature row, the same for every frame of a segment: a level change, a
spectral tilt, a smooth random EQ (a few cosines over the rows) and, for some segments, a low-pass
that rolls the top rows off. Values at the item's floor (digital silence) stay there, so a channel
never invents a noise floor. A codec reproduces what it is given, so training feeds the model the
channel's output as both input and target: the model learns to code spectra it will meet on other
microphones, rather than to undo the channel.

A room and its noise act on power, frame by frame: :func:`add_reverb` adds to each frame an
exponentially decaying sum of the frames before it (a light late reverberation: reverberation
time and direct-to-reverberant ratio at random), :func:`add_noise` a stationary noise of random
colour at a random signal-to-noise ratio. Both are training options of their own
(``train.augment_reverb``, ``train.augment_noise``).

A speaker of another size, as vocal tract length perturbation makes one: :func:`warp_rows` moves
every formant by the same random factor, reading each row's frequency from the feature's own axis
(``train.augment_warp``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

LEVEL_DB = 6.0  # level change, uniform in +-this
TILT_DB = 8.0  # difference between the top and the bottom row, uniform in +-this
EQ_DB = 6.0  # the EQ curve's cosines together reach at most this
EQ_TERMS = 3  # cosines of the EQ curve: half a period over the rows up to this many
LOWPASS_SHARE = 0.25  # share of channels that also low-pass
LOWPASS_CUTOFF = (0.6, 0.95)  # where the roll-off starts, as a fraction of the rows
LOWPASS_DB_PER_ROW = 12.0
REVERB_T60 = (0.2, 0.6)  # seconds for the reverberation to fall 60 dB, uniform in this range
REVERB_DRR_DB = (6.0, 15.0)  # direct over reverberant energy (dB), uniform in this range
REVERB_T60_FRAMES = 2.0  # the tail is summed over this many times the T60 (120 dB down)
NOISE_SNR_DB = (15.0, 40.0)  # the segment's mean power over the noise's (dB), uniform
NOISE_TILT_DB = 12.0  # the noise's top row against its bottom row, uniform in +-this
WARP_LOG = 0.12  # natural log of the largest frequency warp: factors from 0.89 to 1.13


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


def add_reverb(x: Tensor, rng: np.random.Generator, frame_seconds: float) -> Tensor:
    """dB features ``x`` ``(F, N)``, frames ``frame_seconds`` apart, with a random light room:
    each frame's power plus the power of the frames before it, decaying by 60 dB per reverberation
    time, the tail's energy :data:`REVERB_DRR_DB` below the direct sound's: ``(F, N)``."""
    t60 = rng.uniform(*REVERB_T60)
    decay = 10 ** (-6 * frame_seconds / t60)  # power ratio from one frame to the next
    lags = torch.arange(1, max(2, round(REVERB_T60_FRAMES * t60 / frame_seconds)) + 1)
    tail = decay ** lags.double()
    tail *= 10 ** (-rng.uniform(*REVERB_DRR_DB) / 10) / tail.sum()
    power = torch.pow(10.0, x.double() / 10)
    kernel = torch.cat([tail.flip(0), torch.zeros(1, dtype=torch.float64)])  # causal, lag >= 1
    late = F.conv1d(F.pad(power[:, None], (len(tail), 0)), kernel[None, None])[:, 0]
    return (10 * torch.log10(power + late)).to(x.dtype)


def add_noise(x: Tensor, rng: np.random.Generator, floor_db: float) -> Tensor:
    """dB features ``x`` ``(F, N)`` plus a stationary noise in power: its level
    :data:`NOISE_SNR_DB` below the segment's mean power, tilted by up to :data:`NOISE_TILT_DB`
    across the rows: ``(F, N)``, never below ``floor_db``."""
    power = torch.pow(10.0, x.double() / 10)
    level = 10 * math.log10(float(power.mean()))
    rows = torch.linspace(0.0, 1.0, x.shape[0], dtype=torch.float64)
    noise_db = (
        level - rng.uniform(*NOISE_SNR_DB) + rng.uniform(-1, 1) * NOISE_TILT_DB * (rows - 0.5)
    )
    noisy = 10 * torch.log10(power + torch.pow(10.0, noise_db / 10)[:, None])
    return noisy.clamp(min=floor_db).to(x.dtype)


def warp_rows(x: Tensor, frequencies: np.ndarray, rng: np.random.Generator) -> Tensor:
    """dB features ``x`` ``(F, N)``, row ``k`` at ``frequencies[k]`` Hz, with every frequency
    scaled by a random factor ``a`` (``log a`` uniform in +-:data:`WARP_LOG`): row ``k`` takes the
    value the input has at ``frequencies[k] / a``, linear between rows, the end rows held beyond
    them: ``(F, N)``."""
    factor = math.exp(rng.uniform(-WARP_LOG, WARP_LOG))
    rows = np.arange(len(frequencies), dtype=np.float64)
    source = torch.from_numpy(np.interp(frequencies / factor, frequencies, rows))
    below = source.floor().long().clamp(max=len(rows) - 2)
    weight = (source - below).to(x.dtype)[:, None]
    return x[below] * (1 - weight) + x[below + 1] * weight
