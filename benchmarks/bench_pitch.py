"""Pitch trackers side by side: the ceiling of the parametric codec with each ``features.pitch``.

Each clip of a folder (by default the four bundled held-out prompts, ``vqkit/assets/sample``) is
analysed with each method and resynthesised from the true envelope, F0 and voicing (the bench's
``oracle-harmonic`` row: no network, no bits) by the model's own synthesiser. Means over clips of
PESQ-NB, PESQ-WB and STOI against the original, the share of frames called voiced, and the
analysis time per second of audio (one thread)::

    .venv/bin/python benchmarks/bench_pitch.py [DIR] [--model default]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
import typing
from pathlib import Path

import numpy as np
import torch

from vqkit.audio.io import read_audio
from vqkit.checkpoint import load_checkpoint
from vqkit.codec.codec import Codec
from vqkit.config import PitchMethod, replace
from vqkit.eval.baselines import Oracle
from vqkit.eval.metrics import pesq_nb, pesq_wb, stoi
from vqkit.run import resolve_model

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "vqkit" / "assets" / "sample"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, nargs="?", default=SAMPLE)
    parser.add_argument("--model", default="default", help="a parametric model (default)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    checkpoint = load_checkpoint(resolve_model(args.model))
    paths = sorted(p for p in args.folder.iterdir() if p.suffix in (".wav", ".flac"))
    print(f"{len(paths)} clips of {args.folder}, model {args.model}")
    print("method    PESQ-NB  PESQ-WB  STOI   voiced  analysis x real time")
    for method in typing.get_args(PitchMethod):
        config = replace(checkpoint.config, features={"pitch": method})
        codec = Codec(dataclasses.replace(checkpoint, config=config))
        rate, scores, voiced, seconds, duration = codec.sample_rate, [], [], 0.0, 0.0
        for path in paths:
            wave = read_audio(path, rate)[0]
            out = Oracle(codec).run(wave, rate)
            scores.append([f(wave, out.wave, rate) for f in (pesq_nb, pesq_wb, stoi)])
            start = time.process_time()
            voiced.append(float(codec.frontend.pitch(torch.from_numpy(wave)[None])[1].mean()))
            seconds += time.process_time() - start
            duration += len(wave) / rate
        nb, wb, st = np.mean(scores, axis=0)
        print(
            f"{method:8s}  {nb:7.3f}  {wb:7.3f}  {st:.3f}  {np.mean(voiced):6.2f}  "
            f"{seconds / duration:.4f}"
        )


if __name__ == "__main__":
    main()
