"""``vqkit pager``: a self-contained HTML page that steps through an utterance frame by frame.

For every feature frame it shows the original spectrum against the model's reconstruction (a line
plot on a ``<canvas>``, drawn by inline JavaScript from JSON embedded in the page), the code each
quantizer stage chose for the latent frame it falls in, and the frame's spectral distortion (RMS
over bins of the dB difference). Above the plot two spectrogram strips (original, reconstruction)
and the distortion over time show where the frame is; click them to jump.

Keys: Left/Right one frame, Up/Down or PageUp/PageDown ten, Home/End the ends; or the slider.
The URL hash ``#frame=N`` opens at frame N and ``#keys=Right,Right,Left`` replays key presses
through the same handler after loading; the page title always reads ``frame I / N``, so a headless
browser can check navigation with ``--dump-dom``.
"""

from __future__ import annotations

import html
import importlib.resources
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vqkit.errors import VqkitError
from vqkit.files import AUDIO_SUFFIXES, atomic_write_bytes, check_output
from vqkit.tools.inputs import SpectrogramModel, ToolInput, load_spectrogram_model, read_input
from vqkit.train.losses import spectral_distortion_db

DB_SPAN = 100.0  # the plot shows at most this many dB below the loudest value
MEL_AXIS = "mel band"


@dataclass
class PagerInfo:
    """What :func:`write_pager` wrote."""

    path: Path
    n_frames: int
    mean_distortion_db: float
    n_codebooks: int  # stages shown (0 for a continuous model)


def write_pager(
    input: str | os.PathLike,
    model: str | os.PathLike,
    out: str | os.PathLike,
    n_codebooks: int | None = None,
) -> PagerInfo:
    """Write the page for ``input`` (an audio file or ``CACHE#KEY``, see :mod:`vqkit.tools.inputs`)
    reconstructed by ``model`` (a run folder or checkpoint) with its first ``n_codebooks`` stages
    (all when None)."""
    out = Path(out)
    check_output(out, str(input).partition("#")[0], model, refuse_suffixes=AUDIO_SUFFIXES)
    if out.suffix.lower() not in (".html", ".htm"):
        raise VqkitError(f"{out}: the page must be an .html file")
    spec = load_spectrogram_model(model)
    utterance = read_input(input, spec)
    data = pager_data(spec, utterance, n_codebooks)
    atomic_write_bytes(out, render(data).encode("utf-8"))
    return PagerInfo(out, len(data["x"]), data["mean_distortion_db"], data["n_codebooks"])


@torch.no_grad()
def pager_data(
    spec: SpectrogramModel, utterance: ToolInput, n_codebooks: int | None = None
) -> dict[str, Any]:
    """Everything the page draws: spectra, reconstruction, codes and distortion, as plain JSON."""
    model, normaliser = spec.model.eval(), spec.normaliser
    bottleneck = model.bottleneck
    if n_codebooks is not None and not 1 <= n_codebooks <= max(bottleneck.n_codebooks, 1):
        raise VqkitError(
            f"--stages must be in 1..{bottleneck.n_codebooks} for this model, got {n_codebooks}"
        )
    x_db, side = utterance.x_db[None], utterance.side[None]
    out = model(normaliser.normalise(x_db, side), n_codebooks if bottleneck.discrete else None)
    x_hat_db = normaliser.denormalise(out.x_hat, side)
    per_frame = (x_db - x_hat_db).pow(2).mean(1).sqrt()[0]
    codes = out.bottleneck.codes
    top = math.ceil(max(x_db.max().item(), x_hat_db.max().item())) + 3
    bottom = max(math.floor(min(x_db.min().item(), x_hat_db.min().item())), top - DB_SPAN)
    config = spec.config
    return {
        "title": utterance.name,
        "model": spec.name,
        "model_id": spec.checkpoint.model_id,
        "features": _describe_features(spec),
        "axis": _axis(spec),
        "axis_label": "frequency (Hz)" if config.features.kind != "mel" else MEL_AXIS,
        "hop_seconds": spec.frontend.hop_length / config.audio.sample_rate,
        "downsample": model.downsample,
        "db_range": [bottom, top],
        "x": _rows(x_db[0]),
        "x_hat": _rows(x_hat_db[0]),
        "distortion": np.round(per_frame.numpy(), 2).tolist(),
        "mean_distortion_db": round(spectral_distortion_db(x_db, x_hat_db).item(), 3),
        "n_codebooks": 0 if codes is None else codes.shape[1],
        "codebook_size": bottleneck.codebook_size,
        "codes": None if codes is None else _codes_by_column(codes[0]),
    }


def _rows(x: torch.Tensor) -> list[list[float]]:
    """``(F, N)`` dB -> N frames of F values, to 0.1 dB (the page's resolution)."""
    return np.round(x.T.numpy().astype(np.float64), 1).tolist()


def _codes_by_column(codes: torch.Tensor) -> list[list[list[int]]]:
    """Codes ``(Q, N')`` or ``(Q, H', N')`` -> per latent column, per stage, the codes in it."""
    if codes.dim() == 2:
        codes = codes[:, None]
    return codes.permute(2, 0, 1).tolist()


def _axis(spec: SpectrogramModel) -> list[float]:
    """The x axis of the spectrum plot: bin frequencies in Hz, or mel band numbers."""
    features, frontend = spec.config.features, spec.frontend
    if features.kind == "stft":
        return np.linspace(0.0, frontend.sample_rate / 2, frontend.n_bins).round(1).tolist()
    if features.kind == "ratek":
        return np.round(frontend.freqs, 1).tolist()
    return list(range(frontend.n_bins))


def _describe_features(spec: SpectrogramModel) -> str:
    f, sample_rate = spec.config.features, spec.config.audio.sample_rate
    return (
        f"{f.kind}, {spec.frontend.n_bins} bins, n_fft {f.n_fft}, hop_length {f.hop_length} "
        f"at {sample_rate} Hz, normalise {f.normalise}"
    )


def render(data: dict[str, Any]) -> str:
    """The page: the template with the title and the data as JSON (every ``<`` written ``\\u003c``,
    so no string can end the script element), filled in one pass."""
    values = {
        "TITLE": html.escape(data["title"]),
        "DATA": json.dumps(data, separators=(",", ":")).replace("<", "\\u003c"),
    }
    page = (importlib.resources.files("vqkit") / "assets" / "pager.html").read_text("utf-8")
    return re.sub(r"\{\{(TITLE|DATA)\}\}", lambda m: values[m.group(1)], page)
