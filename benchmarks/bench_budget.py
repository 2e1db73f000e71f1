"""Where a parametric model's quality goes: the decoder's inputs swapped, one at a time, between
the true analysis and the coded values.

Each clip of a folder (by default the four bundled held-out prompts, ``vqkit/assets/sample``) is
analysed by the model's front end and resynthesised by its synthesiser from:

- ``true parameters``: the analysed envelope, F0 and voicing (the bench's ``oracle-harmonic``);
- ``+ post-filter``: the same with the decoder's post-filter on the envelope;
- ``autoencoder, no VQ``: the envelope through the network unquantised, the true F0 and voicing;
- ``N stages``: the envelope coded with N residual stages, the true F0 and voicing;
- ``N stages + side codes``: what the codec decodes at that rate (its pitch and voicing coded too).

Each row's loss against the one above it is what that step costs. Means over clips of PESQ-NB,
PESQ-WB and STOI against the original (one thread)::

    .venv/bin/python benchmarks/bench_budget.py [DIR] [--model default] [--stages 4,11]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from vqkit.audio.envelope import fill_unvoiced
from vqkit.audio.io import read_audio
from vqkit.audio.synthesis import make_synthesiser, postfilter
from vqkit.codec.codec import Codec, load_codec
from vqkit.codec.side import side_codes
from vqkit.errors import VqkitError
from vqkit.eval.metrics import pesq_nb, pesq_wb, stoi
from vqkit.run import resolve_model

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "vqkit" / "assets" / "sample"


def variants(codec: Codec, wave: torch.Tensor, stages: list[int]) -> dict[str, tuple]:
    """Envelope (dB), F0 and voicing for each row, from one clip ``(1, T)`` at the model's rate."""
    envelope, f0, voiced = codec.frontend.analyse(wave)
    n, strength = envelope.shape[-1], codec.config.codec.postfilter
    true_side = (fill_unvoiced(f0, voiced), voiced)

    def filtered(x: torch.Tensor) -> torch.Tensor:
        return postfilter(x[0], strength, codec.bandwidths)[None]

    normalised = codec.normaliser.normalise(envelope)
    unquantised = codec.model.decoder(codec.model(normalised).z)[..., :n]
    unquantised = codec.normaliser.denormalise(unquantised, unquantised.new_zeros(1, 0))
    rows = {
        "true parameters": (envelope, *true_side),
        "+ post-filter": (filtered(envelope), *true_side),
        "autoencoder, no VQ": (filtered(unquantised), *true_side),
    }
    side = side_codes(f0, voiced, codec.downsample, codec.side_coding)[0]
    for q in stages:
        codes = codec.model.encode(normalised, q, codec.beam)[0]
        frames = codec.decode_window(torch.cat([side, codes]))  # the decoder's own path
        coded = frames.features[None, :, :n]
        rows[f"{q} stages"] = (coded, *true_side)
        rows[f"{q} stages + side codes"] = (coded, frames.f0[None, :n], frames.voiced[None, :n])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, nargs="?", default=SAMPLE)
    parser.add_argument("--model", default="default", help="a parametric model (default)")
    parser.add_argument("--stages", default="4,11", help="envelope stage counts, comma-separated")
    args = parser.parse_args()
    torch.set_num_threads(1)
    codec = load_codec(resolve_model(args.model))
    if not codec.parametric:
        raise SystemExit(f"error: {args.model} is not a parametric model")
    stages = [int(q) for q in args.stages.split(",")]
    if not all(1 <= q <= codec.model.bottleneck.n_codebooks for q in stages):
        raise SystemExit(f"error: --stages must lie in 1..{codec.model.bottleneck.n_codebooks}")
    synthesiser = make_synthesiser(codec.config.codec, codec.frontend)
    rate = codec.sample_rate
    paths = sorted(p for p in args.folder.iterdir() if p.suffix in (".wav", ".flac"))
    scores: dict[str, list[list[float]]] = {}
    for path in paths:
        try:
            wave = read_audio(path, rate)[0]
        except VqkitError as e:
            raise SystemExit(f"error: {e}") from None
        x = torch.from_numpy(wave)[None]
        with torch.inference_mode():
            rows = variants(codec, x, stages)
            for name, (envelope, f0, voiced) in rows.items():
                y = synthesiser(envelope, x.shape[1], f0=f0, voiced=voiced)[0].numpy()
                row = [metric(wave, y, rate) for metric in (pesq_nb, pesq_wb, stoi)]
                scores.setdefault(name, []).append(row)
    print(f"{len(paths)} clips of {args.folder}, model {args.model}")
    print(f"{'decoder input':26s}  PESQ-NB  PESQ-WB  STOI")
    for name, rows in scores.items():
        nb, wb, st = np.mean(rows, axis=0)
        print(f"{name:26s}  {nb:7.3f}  {wb:7.3f}  {st:.3f}")


if __name__ == "__main__":
    main()
