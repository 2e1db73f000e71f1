"""``vqkit generate``: new speech-like sound from a trained model's latent space.

- A VAE (``bottleneck.kind = "gaussian"``) decodes ``z ~ N(0, I)``
  (:meth:`~vqkit.nn.model.Autoencoder.sample_latent`), and interpolates linearly between the latents
  of two encoded clips (an AE, ``"identity"``, only interpolates: it has no prior to sample).
- A discrete model (vq, rvq, fsq) decodes codes drawn i.i.d. per latent frame and stage from the
  code frequencies it produces on its training split (a unigram prior: it shows what the codebook
  holds, not how speech moves from code to code).

Decoded features are denormalised with the statistics stored in the checkpoint and turned into
sound by the model's synthesiser (Griffin-Lim, :mod:`vqkit.audio.synthesis`): the seed's
generator put the magnitudes through an inverse STFT with zero phase, which buzzes; Griffin-Lim
estimates a phase that fits them. Writes ``sample-NN.wav``, ``interp-NN.wav``,
``spectrograms.png`` and ``generate.json`` into the output folder.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from vqkit.audio.io import write_audio
from vqkit.audio.synthesis import make_synthesiser
from vqkit.data.cache import FeatureCache
from vqkit.data.dataset import SegmentDataset
from vqkit.errors import VqkitError
from vqkit.files import atomic_path, check_output, write_json
from vqkit.nn.codebook import code_counts, code_stats
from vqkit.tools.inputs import (
    SpectrogramModel,
    ToolInput,
    load_spectrogram_model,
    open_cache,
    read_input,
    row_utterance,
)
from vqkit.train.validate import equal_shape_batches

MAX_N, MAX_SECONDS = 256, 600  # a bound on the samples held: 256 x 10 minutes
PEAK = 0.95  # generated audio louder than this is scaled down to it rather than clipped


@dataclass
class Generated:
    """What :func:`generate` wrote: the WAV files (samples, then interpolations) and the figure."""

    out: Path
    samples: list[Path] = field(default_factory=list)
    interpolations: list[Path] = field(default_factory=list)
    figure: Path | None = None
    kind: str = ""  # "vae", "ae" or "codes"
    code_stats: dict[str, float] = field(default_factory=dict)  # usage and perplexity per stage


def generate(
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    n: int = 8,
    data: str | os.PathLike | None = None,
    sources: tuple[str, str] | None = None,
    seconds: float = 2.0,
    seed: int = 0,
    iters: int | None = None,
) -> Generated:
    """Write ``n`` samples of ``model`` (VQ and VAE models) to the folder ``out``, and ``n``
    interpolation steps between two clips when ``data`` or ``sources`` gives them (an AE, which
    has no prior to sample, only interpolates).

    ``data`` is the feature cache the model was trained on: its training split gives a discrete
    model's code frequencies, and its test split the two clips to interpolate between unless
    ``sources`` names them (audio files or ``CACHE#KEY``). Samples last ``seconds``.
    """
    if not 1 <= n <= MAX_N or not 0 < seconds <= MAX_SECONDS:
        raise VqkitError(
            f"need --n 1..{MAX_N} and --seconds in (0, {MAX_SECONDS}], got {n} and {seconds}"
        )
    spec = load_spectrogram_model(model)
    if spec.config.features.kind not in ("stft", "mel"):
        raise VqkitError(f"features.kind '{spec.config.features.kind}' cannot be made audible")
    cache = open_cache(data, spec) if data is not None else None
    generator = torch.Generator().manual_seed(seed)
    check_output(out, model, *([data] if data is not None else []))
    result = Generated(Path(out))
    frames = spec.frontend.n_frames(round(seconds * spec.config.audio.sample_rate))
    with torch.no_grad():
        if spec.model.bottleneck.discrete:
            counts = code_frequencies(spec, _need(cache, "sampling codes"))
            result.kind, result.code_stats = "codes", code_stats(counts)
            x_db = sample_codes(spec, counts, _mean_side(spec, cache), n, frames, generator)
        elif spec.config.bottleneck.kind == "gaussian":
            result.kind = "vae"
            x_db = sample_vae(spec, cache, n, frames, generator)
        else:
            result.kind, x_db = "ae", None
        panels = []
        if x_db is not None:
            result.samples = _write_waves(spec, x_db, result.out, "sample", iters)
            panels += list(zip(result.samples, x_db, strict=True))
        clips_given = cache is not None or sources is not None
        if result.kind == "ae" or (result.kind == "vae" and clips_given):
            x_db = interpolate(spec, _clips(spec, cache, sources), n)
            result.interpolations = _write_waves(spec, x_db, result.out, "interp", iters)
            panels += list(zip(result.interpolations, x_db, strict=True))
    result.figure = result.out / "spectrograms.png"
    plot_spectrograms(panels, spec, result.figure)
    write_json(result.out / "generate.json", _summary(spec, result, seed, seconds, sources))
    return result


def _need(cache: FeatureCache | None, what: str) -> FeatureCache:
    if cache is None:
        raise VqkitError(f"{what} needs --data CACHE, the feature cache the model was trained on")
    return cache


def code_frequencies(spec: SpectrogramModel, cache: FeatureCache, batch_size: int = 64) -> Tensor:
    """How often the model chooses each code of each stage on the training split: ``(Q, K)``.

    Whole items, batched by equal length, so no padding changes a code.
    """
    items = SegmentDataset(cache, "train", 0, train=False)
    if len(items) == 0:
        raise VqkitError(f"{cache.root} has no training items to count codes on")
    size = spec.model.bottleneck.codebook_size
    counts = torch.zeros(spec.model.bottleneck.n_codebooks, size, dtype=torch.long)
    for batch in equal_shape_batches(items, len(items), batch_size):
        codes = spec.model.encode(torch.stack([items[i] for i in batch]))
        counts += code_counts(codes, size)
    return counts


def draw_codes(
    counts: Tensor, n: int, latent_size: tuple[int, ...], generator: torch.Generator
) -> Tensor:
    """Codes ``(n, Q, *latent_size)`` drawn independently per position and stage, stage ``q``
    from the distribution ``counts[q] / counts[q].sum()`` (``counts`` is ``(Q, K)``)."""
    probs = counts.double() / counts.double().sum(1, keepdim=True)
    draws = torch.multinomial(probs, n * math.prod(latent_size), True, generator=generator)
    return draws.reshape(counts.shape[0], n, *latent_size).transpose(0, 1).contiguous()


def sample_codes(
    spec: SpectrogramModel,
    counts: Tensor,
    side: Tensor,
    n: int,
    frames: int,
    generator: torch.Generator,
) -> Tensor:
    """``n`` feature sequences in dB ``(n, F, frames)`` decoded from codes drawn from ``counts``
    (:func:`draw_codes`); ``side`` ``(1, n_side)`` is the side info to denormalise with."""
    model = spec.model
    codes = draw_codes(counts, n, model.latent_shape(frames)[1:], generator)
    return spec.normaliser.denormalise(model.decode(codes, frames), side.expand(n, -1))


def sample_vae(
    spec: SpectrogramModel,
    cache: FeatureCache | None,
    n: int,
    frames: int,
    generator: torch.Generator,
) -> Tensor:
    """``n`` feature sequences in dB ``(n, F, frames)`` decoded from ``z ~ N(0, I)``."""
    model = spec.model
    z = model.sample_latent((n, *model.latent_shape(frames)), generator)
    return spec.normaliser.denormalise(
        model.decode(z, frames), _mean_side(spec, cache).expand(n, -1)
    )


def _mean_side(spec: SpectrogramModel, cache: FeatureCache | None) -> Tensor:
    """The training split's mean min-max side info ``(1, n_side)`` (empty for other kinds)."""
    if spec.normaliser.n_side == 0:
        return torch.zeros(1, 0)
    rows = _need(cache, "a model with min-max features").items("train")
    return torch.tensor(
        [[np.mean([r["x_min"] for r in rows]), np.mean([r["x_max"] for r in rows])]]
    )


def _clips(
    spec: SpectrogramModel, cache: FeatureCache | None, sources: tuple[str, str] | None
) -> list[ToolInput]:
    """The two utterances to interpolate between: ``sources``, else the first two test items."""
    if sources is not None:
        return [read_input(source, spec) for source in sources]
    test = _need(cache, "interpolating without --from A B").items("test")
    if len(test) < 2:
        raise VqkitError(f"{cache.root} has fewer than 2 test items; pass --from A B")
    return [row_utterance(cache, row, spec) for row in test[:2]]


def interpolate(spec: SpectrogramModel, clips: list[ToolInput], n: int) -> Tensor:
    """``n`` steps from the first clip's latent to the second's, decoded: ``(n, F, N)`` dB with
    ``N`` the shorter clip's length; the side info is interpolated alike."""
    frames = min(clip.x_db.shape[-1] for clip in clips)
    x_db = torch.stack([clip.x_db[:, :frames] for clip in clips])
    side = torch.stack([clip.side for clip in clips])
    z = spec.model.encode(spec.normaliser.normalise(x_db, side))  # (2, D, *S')
    t = torch.linspace(0.0, 1.0, n).reshape(n, *[1] * (z.dim() - 1))
    z_t = (1 - t) * z[0] + t * z[1]
    side_t = (1 - t.reshape(n, 1)) * side[0] + t.reshape(n, 1) * side[1]
    return spec.normaliser.denormalise(spec.model.decode(z_t, frames), side_t)


def _write_waves(
    spec: SpectrogramModel, x_db: Tensor, out: Path, stem: str, iters: int | None
) -> list[Path]:
    """Synthesise features in dB ``(n, F, N)`` and write ``stem-NN.wav`` files."""
    synthesiser = make_synthesiser(spec.config.codec, spec.frontend, iters)
    length = (x_db.shape[-1] - 1) * spec.frontend.hop_length
    waves = synthesiser(x_db, length).numpy()
    paths = []
    for i, wave in enumerate(waves):
        peak = float(np.abs(wave).max())
        path = out / f"{stem}-{i:02d}.wav"
        write_audio(path, wave * (PEAK / peak if peak > PEAK else 1.0), spec.frontend.sample_rate)
        paths.append(path)
    return paths


def plot_spectrograms(
    panels: list[tuple[Path, Tensor]], spec: SpectrogramModel, path: Path
) -> None:
    """Every generated spectrogram ``(F, N)`` dB, four to a row, titled by its file name."""
    n_cols = min(4, len(panels))
    n_rows = math.ceil(len(panels) / n_cols)
    figure = Figure(figsize=(3.2 * n_cols, 1.9 * n_rows + 0.2), dpi=72)
    FigureCanvasAgg(figure)
    top = max(float(x.max()) for _, x in panels)
    rate, hop = spec.frontend.sample_rate, spec.frontend.hop_length
    stft = spec.config.features.kind == "stft"
    for i, (name, x_db) in enumerate(panels):
        axes = figure.add_subplot(n_rows, n_cols, i + 1)
        extent = (0.0, x_db.shape[-1] * hop / rate, 0.0, rate / 2000 if stft else x_db.shape[0])
        axes.imshow(x_db.numpy(), origin="lower", aspect="auto", extent=extent, vmin=top - 80)
        axes.set_title(name.name, fontsize=8, loc="left")
        axes.tick_params(labelsize=6)
        if i % n_cols == 0:
            axes.set_ylabel("kHz" if stft else "mel band", fontsize=7)
        if i >= len(panels) - n_cols:
            axes.set_xlabel("s", fontsize=7)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")


def _summary(
    spec: SpectrogramModel,
    result: Generated,
    seed: int,
    seconds: float,
    sources: tuple[str, str] | None,
) -> dict:
    return {
        "model": spec.name,
        "model_id": spec.checkpoint.model_id,
        "kind": result.kind,
        "seed": seed,
        "seconds": seconds,
        "sources": list(sources) if sources else None,
        "samples": [p.name for p in result.samples],
        "interpolations": [p.name for p in result.interpolations],
        "synthesis": spec.config.codec.synthesis,
        "code_stats": result.code_stats,
    }
