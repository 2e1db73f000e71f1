"""Quality metrics for speech codecs: spectral distances, PESQ, STOI, SI-SDR and codebook usage."""

from __future__ import annotations

import torch
from torch import Tensor


def spectral_distortion_db(x_db: Tensor, x_hat_db: Tensor) -> Tensor:
    """Spectral distortion in dB: per frame the RMS over bins of the dB difference, then the mean
    over frames.

    Args:
        x_db: reference spectra in dB, shape (B, F, N).
        x_hat_db: reconstructed spectra in dB, shape (B, F, N).

    Returns:
        One distortion per item, shape (B,).
    """
    if x_db.shape != x_hat_db.shape or x_db.dim() != 3:
        raise ValueError(
            f"expected x_db and x_hat_db of the same shape (B, F, N), "
            f"got {tuple(x_db.shape)} and {tuple(x_hat_db.shape)}"
        )
    per_frame = torch.sqrt(torch.mean((x_db - x_hat_db) ** 2, dim=1))  # (B, N)
    return per_frame.mean(dim=1)
