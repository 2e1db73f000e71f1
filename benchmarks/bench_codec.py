"""Codec speed on one thread: encode, decode and the synthesis stage alone, as real-time factors.

Real-time factor (RTF) = processing time / audio duration (lower is faster; 0.05 means 20x real
time; the target is encode + decode under 0.05). The audio is the bundled sample (four held-out
prompts, 12.6 s at 16 kHz) unless given. Without ``--model`` the model is a recipe
(``--recipe``, by default the shipped one, configs/speech_parametric.toml) with random weights:
speed does not depend on the weights. Each figure is the median of ``--repeats`` runs::

    .venv/bin/python benchmarks/bench_codec.py [--model RUN_OR_CHECKPOINT] [--audio A.wav ...]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from vqkit.audio.frontends import make_frontend
from vqkit.audio.io import read_audio
from vqkit.audio.synthesis import Frames, make_synthesiser
from vqkit.checkpoint import save_checkpoint
from vqkit.codec.codec import Codec, load_codec
from vqkit.config import load_config
from vqkit.nn.model import build_model

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = sorted((ROOT / "vqkit" / "assets" / "sample").glob("*.flac"))
RECIPE = ROOT / "configs" / "speech_parametric.toml"


def random_model(recipe: Path, path: Path) -> Path:
    """A recipe's model with random weights, saved as a checkpoint at ``path``."""
    config = load_config(recipe)
    n_bins = make_frontend(config.features, config.audio.sample_rate).n_bins
    torch.manual_seed(0)
    model = build_model(config, (n_bins,))
    model.normaliser.set_statistics(torch.full((n_bins,), -40.0), torch.full((n_bins,), 20.0))
    save_checkpoint(path, model, config, meta={"in_shape": [n_bins]})
    return path


def median_seconds(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median wall-clock and process CPU seconds of ``fn()``. With one thread the CPU time is
    what the work costs even on a busy machine; the wall time is what a user waits."""
    fn()  # warm-up
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def measure(codec: Codec, wave: np.ndarray, repeats: int) -> dict[str, tuple[float, float]]:
    """(wall, CPU) RTF of encode, of decode, of both and of the synthesis stage alone (on the
    decoded features, as decoding runs it), with every stage the model has."""
    seconds = len(wave) / codec.sample_rate
    encoded = codec.encode(wave, codec.sample_rate)
    times = {
        "encode": median_seconds(lambda: codec.encode(wave, codec.sample_rate), repeats),
        "decode": median_seconds(lambda: codec.decode(encoded), repeats),
    }
    coding, side = codec.side_layout(encoded)
    frames = Frames.cat(
        list(codec._decode_frames(encoded.codes, encoded.n_frames, coding, len(side)))
    )
    synthesiser = make_synthesiser(codec.config.codec, codec.frontend)
    with torch.inference_mode():
        synthesis = median_seconds(lambda: frames.synthesise(synthesiser, len(wave)), repeats)
    times["synthesis alone"] = synthesis
    rtf = {name: (wall / seconds, cpu / seconds) for name, (wall, cpu) in times.items()}
    rtf["encode + decode"] = tuple(e + d for e, d in zip(rtf["encode"], rtf["decode"], strict=True))
    return rtf


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="run folder or checkpoint (default: random weights)")
    parser.add_argument("--recipe", type=Path, default=RECIPE, help="config of the random model")
    parser.add_argument("--audio", nargs="+", type=Path, default=SAMPLE, help="audio files")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "random.safetensors"
        codec = load_codec(args.model or random_model(args.recipe, path))
    wave = np.concatenate([read_audio(path, codec.sample_rate)[0] for path in args.audio])
    seconds = len(wave) / codec.sample_rate
    cpus = os.cpu_count()
    print(f"machine: {platform.machine()}, {cpus} CPUs, torch {torch.__version__}, {args.threads}")
    print(f"thread(s); audio: {len(args.audio)} files, {seconds:.1f} s at {codec.sample_rate} Hz")
    print(f"model: {args.model or f'{args.recipe.name}, random weights'} ({codec.model_id}),")
    print(f"{codec.n_codebooks} stages x {codec.codebook_size} codes at {codec.frame_rate:g} Hz,")
    print(f"synthesis: {codec.config.codec.synthesis}")
    rtf = measure(codec, wave, args.repeats)
    print(f"\n{'real-time factor, median of ' + str(args.repeats):<34} {'wall':>7} {'CPU':>7}")
    for name, (wall, cpu) in rtf.items():
        print(f"{name:<34} {wall:7.4f} {cpu:7.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
