"""What training minimises and validation reports: the reconstruction loss, the weights training
gives its errors, and spectral distortion between dB spectra (also used by
:mod:`vqkit.eval.metrics` on resynthesised audio)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from vqkit.audio.frontends import row_frequencies
from vqkit.config import Config, ReconLoss, choices
from vqkit.errors import VqkitError
from vqkit.nn.normalise import Normaliser

LSD_FLOOR_DB = 80.0  # spectral floor below the reference's loudest bin, so silence is finite

RECON_LOSSES = choices(ReconLoss)


def reconstruction_loss(
    x_hat: Tensor, x: Tensor, kind: str, weight: Tensor | None = None
) -> Tensor:
    """Mean squared and/or absolute error between ``x_hat`` and ``x`` of the same shape.

    ``weight`` (broadcastable to ``x``, e.g. ``(F, 1)`` for the rows of ``(B, F, N)`` spectra)
    weights each element; it is scaled to mean 1, so an equal weighting is the plain mean."""
    if x_hat.shape != x.shape:
        raise ValueError(f"model output shape {tuple(x_hat.shape)} != input {tuple(x.shape)}")
    if kind not in RECON_LOSSES:
        raise VqkitError(f"train.recon_loss must be one of {', '.join(RECON_LOSSES)}, got '{kind}'")
    error = x_hat - x
    if weight is None:
        weight = 1.0
    else:
        weight = weight.to(x)
        weight = weight / weight.expand_as(x).mean()
    terms = [(error.abs() * weight).mean()] if "l1" in kind else []
    if "mse" in kind:
        terms.append((error.square() * weight).mean())
    return sum(terms)


def band_weights(config: Config) -> Tensor | None:
    """Training's loss weight of each feature row ``(F, 1)``: ``train.high_band_weight`` above
    ``train.band_split_hz``, 1 below; None when they are all 1."""
    tc = config.train
    if tc.high_band_weight == 1:
        return None
    freqs = row_frequencies(config.features, config.audio.sample_rate)
    rows = torch.tensor(np.where(freqs > tc.band_split_hz, tc.high_band_weight, 1.0)).float()
    if not rows.any():
        raise VqkitError(
            f"train.high_band_weight = 0 above train.band_split_hz = {tc.band_split_hz:g} Hz "
            "leaves no feature row to train on"
        )
    return rows.view(-1, 1)


class LossWeights:
    """The weight training gives each element of a batch's reconstruction error: the band's
    (:func:`band_weights`) times, with ``train.loudness_weight`` = g > 0, the loudness of the
    true spectrum there, ``(P / P_max) ** g`` of its power ``P`` against ``P_max``, the loudest
    point of the segment. With g = 0.23, Zwicker's loudness exponent that PESQ uses, an error
    40 dB below the peak (in a pause, a spectral valley, the quiet high band) counts 0.12 of one
    at the peak, so the model's capacity goes to what a listener hears loudest. Times
    ``train.overshoot_weight`` where the output is above the truth: PESQ, like a listener, hears
    power added to the signal more than power taken from it.

    Validation reports the plain loss (runs compare on it) and the weighted one (``objective``,
    which picks the best checkpoint)."""

    def __init__(self, config: Config, normaliser: Normaliser) -> None:
        self.rows = band_weights(config)
        self.exponent = config.train.loudness_weight
        self.overshoot = config.train.overshoot_weight
        self.normaliser = normaliser  # meanstd or none (config check): dB without side info

    @torch.no_grad()
    def __call__(self, x: Tensor, x_hat: Tensor) -> Tensor | None:
        """Weights of the errors of ``x_hat`` against the normalised features ``x`` ``(B, F, N)``:
        ``(B, F, N)``, ``(F, 1)`` or None (all 1)."""
        weight = self.rows
        if self.exponent != 0:
            x_db = self.normaliser.denormalise(x, self.normaliser.side_info(x))
            level = x_db - x_db.amax(dim=(-2, -1), keepdim=True)
            weight = _times(weight, torch.pow(10.0, self.exponent * level / 10))
        if self.overshoot != 1:  # the normalisation keeps the order of dB values
            weight = _times(weight, torch.where(x_hat > x, self.overshoot, 1.0).to(x))
        return weight


def _times(weight: Tensor | None, factor: Tensor) -> Tensor:
    return factor if weight is None else factor * weight.to(factor)


def spectral_distortion_db(x_db: Tensor, x_hat_db: Tensor) -> Tensor:
    """Spectral distortion in dB: per frame the RMS over bins of the dB difference, then the mean
    over frames.

    Args:
        x_db: reference spectra in dB, shape (B, F, N).
        x_hat_db: reconstructed spectra in dB, shape (B, F, N).

    Returns:
        One distortion per item, shape (B,).
    """
    return torch.sqrt(_frame_mean_square(x_db, x_hat_db)).mean(dim=1)


def spectral_distortion_db2(x_db: Tensor, x_hat_db: Tensor) -> Tensor:
    """Spectral distortion in dB^2 (Codec 2's measure): per frame the mean over bins of the squared
    dB difference, then the mean over frames. Shapes (B, F, N) -> (B,)."""
    return _frame_mean_square(x_db, x_hat_db).mean(dim=1)


def _frame_mean_square(x_db: Tensor, x_hat_db: Tensor) -> Tensor:
    if x_db.shape != x_hat_db.shape or x_db.dim() != 3:
        raise ValueError(
            f"expected x_db and x_hat_db of the same shape (B, F, N), "
            f"got {tuple(x_db.shape)} and {tuple(x_hat_db.shape)}"
        )
    return torch.mean((x_db - x_hat_db) ** 2, dim=1)  # (B, N)
