"""The argument parser of the ``vqkit`` command: every verb and its options, by name. The
commands themselves are in :mod:`vqkit.cli`, which dispatches on the verb."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from vqkit import __version__
from vqkit.config import Layout, choices
from vqkit.errors import VqkitError

Verb = Callable[..., argparse.ArgumentParser]  # verb(name, help) -> the verb's parser
MODEL_HELP = "default (narrowband for input at 8 kHz or below), narrowband, a run or a checkpoint"


class _Parser(argparse.ArgumentParser):
    """argparse, except that a bad argument is the README's one line and exit status 1, not a
    usage block and status 2 (``--help`` still prints the usage)."""

    def error(self, message: str) -> NoReturn:
        verb = self.prog.removeprefix("vqkit").strip()
        raise VqkitError(f"{verb + ': ' if verb else ''}{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every verb; ``args.verb`` names the one given."""
    parser = _Parser(
        prog="vqkit",
        description="Learn discrete and continuous latent codes of speech and images; "
        "encode speech at a low bitrate.",
    )
    parser.add_argument("--version", action="version", version=f"vqkit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help)

    _add_data_verbs(verb)
    _add_codec_verbs(verb)
    _add_eval_verbs(verb)
    _add_teaching_verbs(verb)
    return parser


def _add_data_verbs(verb: Verb) -> None:
    p = verb("prepare", "build a feature cache from a speech or image corpus")
    p.add_argument("src", type=Path, help="corpus root")
    p.add_argument("out", type=Path, help="output feature cache folder")
    p.add_argument(
        "--layout", choices=choices(Layout), help="corpus layout (default: from config, auto)"
    )
    p.add_argument("--config", type=Path, help="TOML recipe")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--speakers", help="comma-separated speakers to keep (l2arctic, folder)")
    p.add_argument("--labels", help="comma-separated labels to keep (speechcommands)")
    p.add_argument("--max-per-speaker", type=int, help="at most N utterances per speaker")
    p.add_argument("--speaker-disjoint", action="store_true", help="split by speaker")
    _add_config_args(p)

    p = verb("train", "train a model on a feature cache")
    p.add_argument("config", type=Path, help="TOML recipe")
    p.add_argument("--data", type=Path, required=True, help="feature cache from vqkit prepare")
    # --run-dir: torchrun's own parser reads a later --run as an abbreviation of its --run-path
    p.add_argument(
        "--run",
        "--run-dir",
        dest="run",
        type=Path,
        required=True,
        help="run folder (checkpoints, metrics); write --run-dir under torchrun",
    )
    p.add_argument("--resume", action="store_true", help="continue from RUN's last checkpoint")
    p.add_argument(
        "--init",
        metavar="MODEL",
        help="start from MODEL's weights (default, a run or a checkpoint)",
    )
    _add_config_args(p)


def _add_eval_verbs(verb: Verb) -> None:
    p = verb("evaluate", "score a trained model on a split of a feature cache")
    p.add_argument("run", type=Path, help="run folder (its best checkpoint) or checkpoint file")
    p.add_argument("--data", type=Path, required=True, help="feature cache from vqkit prepare")
    p.add_argument("--out", type=Path, required=True, help="folder for metrics.json and PNGs")
    p.add_argument("--split", choices=("test", "val", "train"), default="test", help="(test)")
    p.add_argument("--grid", type=int, default=16, help="images in the grid picture (16)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (cpu)")

    p = verb("bench", "compare the codec with Codec 2 and Opus on held-out speech")
    p.add_argument("audio_dir", type=Path, help="folder of held-out speech clips")
    p.add_argument("--out", type=Path, required=True, help="output folder for results and report")
    p.add_argument("--model", default="default", help=MODEL_HELP)
    p.add_argument("--bitrates", help="comma-separated kbit/s for the model (default: all)")
    p.add_argument(
        "--baselines", default="codec2,opus,oracle", help="comma-separated: codec2,opus,oracle"
    )
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1, as the tools use)"
    )
    p.add_argument(
        "--dnsmos",
        default="all",
        help="systems DNSMOS scores (1.2 s CPU a clip): all, none or names/patterns (original)",
    )

    p = verb("listen", "a blind MUSHRA listening test of a bench, or its results")
    p.add_argument("bench_out", type=Path, help="folder written by vqkit bench")
    p.add_argument("--systems", help="comma-separated systems to test (default: all)")
    p.add_argument("--ratings", nargs="+", type=Path, help="aggregate these downloaded results")

    p = verb("demo", "run the shipped model and the baselines on the bundled sample")
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="output folder")


def _add_codec_verbs(verb: Verb) -> None:
    p = verb("encode", "encode audio to a .vqc code file or a packet stream")
    p.add_argument("input", type=Path, help="audio file, or - for raw PCM on standard input")
    p.add_argument("output", type=Path, help="code file (.vqc), or - for a packet stream")
    p.add_argument("--model", default="default", help=MODEL_HELP)
    p.add_argument("--bitrate", type=float, help="target kbit/s (default: the model's highest)")
    p.add_argument("--rate", type=int, help="raw PCM input's sample rate (the model's)")
    p.add_argument("--format", default="s16le", help="raw PCM: s16le (default), s32le, f32le")
    p.add_argument(
        "--gain",
        type=int,
        help="packet stream: dB applied before encoding "
        "(default: a file's level gain; 0 for raw PCM)",
    )
    p.add_argument(
        "--beam",
        type=int,
        help="paths the residual stages are searched with (default: the model's codec.beam, "
        "4 for the shipped ones; 1 is greedy)",
    )

    p = verb("decode", "decode a .vqc code file or a packet stream to audio")
    p.add_argument("input", type=Path, help="code file or packet stream, or - (standard input)")
    p.add_argument("output", type=Path, help="audio file (.wav or .flac), or - for raw PCM")
    p.add_argument(
        "--model",
        default="default",
        help="default (the shipped model that made it), narrowband, a run folder or a checkpoint",
    )
    p.add_argument("--iters", type=int, help="Griffin-Lim iterations (default: the model's)")
    p.add_argument("--format", default="s16le", help="raw PCM output: s16le, s32le, f32le")
    p.add_argument(
        "--conceal",
        action="store_true",
        help="packet stream: conceal bad or cut packets instead of stopping",
    )

    p = verb("convert", "turn a .vqc file into a packet stream or back, losslessly")
    p.add_argument("input", type=Path, help=".vqc file or packet stream, or - (standard input)")
    p.add_argument("output", type=Path, help="the other form, or - for standard output")
    p.add_argument("--model", default="default", help="the model that made it (.vqc to stream)")


def _add_teaching_verbs(verb: Verb) -> None:
    p = verb("viz", "animate a VQ layer learning 2-D toy data (GIF and PNG)")
    p.add_argument("what", choices=("vq",), help="what to animate")
    p.add_argument("--out", type=Path, required=True, help="the .gif to write (and .png beside)")
    p.add_argument("--stages", type=int, choices=(1, 2), default=1, help="VQ stages (1)")
    p.add_argument("--steps", type=int, default=60, help="training steps, one frame each (60)")
    p.add_argument("--codebook-size", type=int, default=0, help="codes per stage (16 / 8)")
    p.add_argument("--update", choices=("ema", "loss"), default="ema", help="codebook update")
    p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1)")

    p = verb("pager", "an HTML page stepping through an utterance's spectral frames")
    p.add_argument("input", help="audio file, or CACHE#ROW (a cache row's index or path)")
    p.add_argument("--model", required=True, help="run folder or checkpoint")
    p.add_argument("--out", type=Path, required=True, help="the .html page to write")
    p.add_argument("--stages", type=int, help="residual VQ stages to use (default: all)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1)")

    p = verb("generate", "sample and interpolate a model's latents, to WAV files")
    p.add_argument("run", help="run folder or checkpoint")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--n", type=int, default=8, help="samples and interpolation steps (8)")
    p.add_argument("--data", type=Path, help="the model's feature cache (code counts, clips)")
    p.add_argument(
        "--from", dest="sources", nargs=2, metavar=("A", "B"), help="clips to interpolate"
    )
    p.add_argument("--seconds", type=float, default=2.0, help="length of samples (2.0)")
    p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    p.add_argument("--iters", type=int, help="Griffin-Lim iterations (default: the model's)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1)")

    p = verb("export", "export encoder+quantizer and decoder as TorchScript or ONNX")
    p.add_argument("run", help="run folder or checkpoint")
    p.add_argument("--format", choices=("torchscript", "onnx"), default="torchscript")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1)")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (repeatable), e.g. --set train.steps=500",
    )
