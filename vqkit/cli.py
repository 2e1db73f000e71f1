"""The ``vqkit`` command, the only module that reads ``sys.argv``: each verb calls the API."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NoReturn

from vqkit import __version__
from vqkit.config import Layout, choices
from vqkit.errors import Interrupted, VqkitError, shown


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (repeatable), e.g. --set train.steps=500",
    )


def cmd_prepare(args: argparse.Namespace) -> int:
    from vqkit.config import load_config
    from vqkit.data.prepare import prepare

    overrides = list(args.overrides)
    if args.layout:
        overrides.append(f"data.layout={args.layout!r}")
    if args.speakers:
        overrides.append(f"data.speakers={_csv(args.speakers)!r}")
    if args.labels:
        overrides.append(f"data.labels={_csv(args.labels)!r}")
    if args.max_per_speaker is not None:
        overrides.append(f"data.max_per_speaker={args.max_per_speaker}")
    if args.speaker_disjoint:
        overrides.append("data.speaker_disjoint=true")
    config = load_config(args.config, overrides)
    with _torch_threads(1):  # per-file tensors are tiny: threads only add contention
        summary = prepare(args.src, args.out, config, workers=args.workers)
    print(summary.describe())
    return 0 if summary.n_ok > 0 else 1


def cmd_train(args: argparse.Namespace) -> int:
    from vqkit.config import load_config
    from vqkit.train.loop import train

    config = load_config(args.config, args.overrides)
    with _torch_threads(config.train.threads or None, "train.threads"):  # 0: as they are
        result = train(config, data=args.data, run=args.run, resume=args.resume)
    for split, row in (("val", result.val), ("test", result.test)):
        if row:
            kept = {k: v for k, v in row.items() if k in ("recon", "sd_db", "psnr_db", "usage/0")}
            print(f"{split}: " + ", ".join(f"{k} {v:.4g}" for k, v in kept.items()))
    print(f"trained {result.step} steps; checkpoints in {result.run / 'checkpoints'}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from vqkit.eval.evaluate import describe_evaluation, evaluate_run

    result = evaluate_run(
        args.run, args.data, args.out, split=args.split, n_grid=args.grid, device=args.device
    )
    print(describe_evaluation(result))
    return 0


def _pipe_ends(args: argparse.Namespace) -> tuple:
    """``args.input`` and ``args.output``, with ``-`` as standard input and output."""
    source = sys.stdin.buffer if str(args.input) == "-" else args.input
    return source, sys.stdout.buffer if str(args.output) == "-" else args.output


def cmd_encode(args: argparse.Namespace) -> int:
    if "-" in (str(args.input), str(args.output)):  # a pipe on either side: a packet stream
        from vqkit.codec.pipes import encode_stream

        options = (args.model, args.bitrate, args.rate, args.format, args.gain)
        info = encode_stream(*_pipe_ends(args), *options)
        print(info, file=sys.stderr if str(args.output) == "-" else sys.stdout)
        return 0
    from vqkit.codec.codec import encode_file

    info = encode_file(args.input, args.output, model=args.model, bitrate=args.bitrate)
    print(info)
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    from vqkit.codec.pipes import decode_stream, is_stream

    if "-" in (str(args.input), str(args.output)) or is_stream(args.input):
        info = decode_stream(*_pipe_ends(args), args.model, args.format, args.conceal)
        print(info, file=sys.stderr if str(args.output) == "-" else sys.stdout)
        return 0
    from vqkit.codec.codec import decode_file

    info = decode_file(args.input, args.output, model=args.model, iters=args.iters)
    print(info)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from vqkit.codec.pipes import convert_codes

    info = convert_codes(*_pipe_ends(args), args.model)
    print(info, file=sys.stderr if str(args.output) == "-" else sys.stdout)
    return 0


def _print_bench(results: dict, out: Path) -> None:
    from vqkit.eval.bench import format_table

    print(format_table(results["summary"]))
    for skip in results["skipped"]:
        print(f"skipped {skip['system']}: {shown(skip['reason'], limit=None)}")
    for unread in results.get("unread", []):
        print(f"not scored: {shown(unread['file'])}: {shown(unread['reason'], limit=None)}")
    for failed in results.get("report_errors", []):
        print(f"no spectrograms of {failed['clip']}: {shown(failed['reason'], limit=None)}")
    print(f"results: {out / 'results.json'} (and results.csv, clips.csv)")
    print(f"report: {out / results['report']}")


def cmd_bench(args: argparse.Namespace) -> int:
    from vqkit.eval.bench import run_bench

    try:
        bitrates = [float(b) for b in _csv(args.bitrates)] if args.bitrates else None
    except ValueError:
        message = f"--bitrates expects comma-separated kbit/s, got '{args.bitrates}'"
        raise VqkitError(message) from None
    with _torch_threads(args.threads):
        results = run_bench(
            args.audio_dir,
            args.out,
            model=args.model,
            bitrates=bitrates,
            baselines=_csv(args.baselines),
            dnsmos={"all": None, "none": []}.get(args.dnsmos, _csv(args.dnsmos)),
        )
    _print_bench(results, args.out)
    return 0


def cmd_listen(args: argparse.Namespace) -> int:
    from vqkit.eval.listen import listen

    systems = _csv(args.systems) if args.systems else None
    print(listen(args.bench_out, systems=systems, ratings=args.ratings))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from vqkit.eval.bench import demo

    with _torch_threads(1):
        results = demo(args.out)
    _print_bench(results, args.out)
    return 0


@contextlib.contextmanager
def _torch_threads(n: int | None, what: str = "--threads") -> Iterator[None]:
    """Run with ``n`` torch threads (None: as they are; ``what`` names the setting in errors),
    then restore the count: the one place vqkit sets it, bounded to the machine's cores by
    :func:`vqkit.limits.torch_threads`. Most verbs run small tensors, where one thread is often
    much faster than two on a busy machine; 1 also makes the bench's real-time factors comparable
    with Codec 2's."""
    from vqkit.limits import torch_threads

    if n is None:
        yield
        return
    with torch_threads(n, what):
        yield


def cmd_viz(args: argparse.Namespace) -> int:
    from vqkit.tools.viz import animate_vq

    with _torch_threads(args.threads):
        result = animate_vq(
            args.out,
            stages=args.stages,
            steps=args.steps,
            codebook_size=args.codebook_size,
            update=args.update,
            seed=args.seed,
        )
        final = ", ".join(f"{d:.3f}" for d in result.distortion[-1])
        print(f"{result.gif} and {result.png}: distortion {final} after {args.steps} steps")
        return 0


def cmd_pager(args: argparse.Namespace) -> int:
    from vqkit.tools.pager import write_pager

    with _torch_threads(args.threads):
        info = write_pager(args.input, args.model, args.out, n_codebooks=args.stages)
        print(
            f"{info.path}: {info.n_frames} frames, mean distortion {info.mean_distortion_db:.2f} dB"
        )
        return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from vqkit.tools.generate import generate

    with _torch_threads(args.threads):
        sources = tuple(args.sources) if args.sources else None
        result = generate(
            args.run,
            args.out,
            n=args.n,
            data=args.data,
            sources=sources,
            seconds=args.seconds,
            seed=args.seed,
            iters=args.iters,
        )
        for name, paths in (("samples", result.samples), ("interpolation", result.interpolations)):
            if paths:
                print(f"{name}: {paths[0]} .. {paths[-1].name}")
        print(f"spectrograms: {result.figure}")
        return 0


def cmd_export(args: argparse.Namespace) -> int:
    from vqkit.tools.export import export_model

    with _torch_threads(args.threads):
        result = export_model(args.run, args.out, format=args.format)
        print(f"{result.format}: {result.encoder} (x -> codes), {result.decoder} (codes -> x_hat)")
        return 0


def _add_teaching_verbs(verb: Callable[..., argparse.ArgumentParser]) -> None:
    p = verb("viz", cmd_viz, "animate a VQ layer learning 2-D toy data (GIF and PNG)")
    p.add_argument("what", choices=("vq",), help="what to animate")
    p.add_argument("--out", type=Path, required=True, help="the .gif to write (and .png beside)")
    p.add_argument("--stages", type=int, choices=(1, 2), default=1, help="VQ stages (1)")
    p.add_argument("--steps", type=int, default=60, help="training steps, one frame each (60)")
    p.add_argument("--codebook-size", type=int, default=0, help="codes per stage (16 / 8)")
    p.add_argument("--update", choices=("ema", "loss"), default="ema", help="codebook update")
    p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1)")

    p = verb("pager", cmd_pager, "an HTML page stepping through an utterance's spectral frames")
    p.add_argument("input", help="audio file, or CACHE#ROW (a cache row's index or path)")
    p.add_argument("--model", required=True, help="run folder or checkpoint")
    p.add_argument("--out", type=Path, required=True, help="the .html page to write")
    p.add_argument("--stages", type=int, help="residual VQ stages to use (default: all)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1)")

    p = verb("generate", cmd_generate, "sample and interpolate a model's latents, to WAV files")
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

    p = verb("export", cmd_export, "export encoder+quantizer and decoder as TorchScript or ONNX")
    p.add_argument("run", help="run folder or checkpoint")
    p.add_argument("--format", choices=("torchscript", "onnx"), default="torchscript")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1)")


class _Parser(argparse.ArgumentParser):
    """argparse, except that a bad argument is the README's one line and exit status 1, not a
    usage block and status 2 (``--help`` still prints the usage)."""

    def error(self, message: str) -> NoReturn:
        verb = self.prog.removeprefix("vqkit").strip()
        raise VqkitError(f"{verb + ': ' if verb else ''}{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="vqkit",
        description="Learn discrete and continuous latent codes of speech and images; "
        "encode speech at a low bitrate.",
    )
    parser.add_argument("--version", action="version", version=f"vqkit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, fn: Callable[[argparse.Namespace], int], help: str):
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(fn=fn)
        return p

    p = verb("prepare", cmd_prepare, "build a feature cache from a speech or image corpus")
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

    p = verb("train", cmd_train, "train a model on a feature cache")
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
    _add_config_args(p)

    p = verb("evaluate", cmd_evaluate, "score a trained model on a split of a feature cache")
    p.add_argument("run", type=Path, help="run folder (its best checkpoint) or checkpoint file")
    p.add_argument("--data", type=Path, required=True, help="feature cache from vqkit prepare")
    p.add_argument("--out", type=Path, required=True, help="folder for metrics.json and PNGs")
    p.add_argument("--split", choices=("test", "val", "train"), default="test", help="(test)")
    p.add_argument("--grid", type=int, default=16, help="images in the grid picture (16)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (cpu)")

    p = verb("encode", cmd_encode, "encode audio to a .vqc code file or a packet stream")
    p.add_argument("input", type=Path, help="audio file, or - for raw PCM on standard input")
    p.add_argument("output", type=Path, help="code file (.vqc), or - for a packet stream")
    p.add_argument("--model", default="default", help="default, a run folder or a checkpoint")
    p.add_argument("--bitrate", type=float, help="target kbit/s (default: the model's highest)")
    p.add_argument("--rate", type=int, help="raw PCM input's sample rate (the model's)")
    p.add_argument("--format", default="s16le", help="raw PCM: s16le (default), s32le, f32le")
    p.add_argument(
        "--gain",
        type=int,
        help="packet stream: dB applied before encoding "
        "(default: a file's level gain; 0 for raw PCM)",
    )

    p = verb("decode", cmd_decode, "decode a .vqc code file or a packet stream to audio")
    p.add_argument("input", type=Path, help="code file or packet stream, or - (standard input)")
    p.add_argument("output", type=Path, help="audio file (.wav or .flac), or - for raw PCM")
    p.add_argument("--model", default="default", help="default, a run folder or a checkpoint")
    p.add_argument("--iters", type=int, help="Griffin-Lim iterations (default: the model's)")
    p.add_argument("--format", default="s16le", help="raw PCM output: s16le, s32le, f32le")
    p.add_argument(
        "--conceal",
        action="store_true",
        help="packet stream: conceal bad or cut packets instead of stopping",
    )

    p = verb("convert", cmd_convert, "turn a .vqc file into a packet stream or back, losslessly")
    p.add_argument("input", type=Path, help=".vqc file or packet stream, or - (standard input)")
    p.add_argument("output", type=Path, help="the other form, or - for standard output")
    p.add_argument("--model", default="default", help="the model that made it (.vqc to stream)")

    p = verb("bench", cmd_bench, "compare the codec with Codec 2 and Opus on held-out speech")
    p.add_argument("audio_dir", type=Path, help="folder of held-out speech clips")
    p.add_argument("--out", type=Path, required=True, help="output folder for results and report")
    p.add_argument("--model", default="default", help="default, a run folder or a checkpoint")
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

    p = verb("listen", cmd_listen, "a blind MUSHRA listening test of a bench, or its results")
    p.add_argument("bench_out", type=Path, help="folder written by vqkit bench")
    p.add_argument("--systems", help="comma-separated systems to test (default: all)")
    p.add_argument("--ratings", nargs="+", type=Path, help="aggregate these downloaded results")

    p = verb("demo", cmd_demo, "run the shipped model and the baselines on the bundled sample")
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="output folder")
    _add_teaching_verbs(verb)
    return parser


TERMINATING = (signal.SIGTERM, signal.SIGHUP)  # handled like Ctrl-C: writers clean up


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into :class:`Interrupted` (a KeyboardInterrupt) while a verb runs,
    so a killed ``decode`` removes its temporary file as Ctrl-C does; restored after."""

    def raise_interrupted(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    previous = {}
    with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
        previous = {s: signal.signal(s, raise_interrupted) for s in TERMINATING}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``vqkit`` command; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except VqkitError as e:
        print(f"vqkit: error: {shown(e, limit=None)}", file=sys.stderr)
        return 1
    try:
        with _interruptible():
            return args.fn(args)
    except VqkitError as e:
        if args.debug:
            raise
        print(f"vqkit: error: {shown(e, limit=None)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        print(f"vqkit: interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        return 128 + signum
    except Exception as e:  # a bug: still one line unless --debug asks for the traceback
        if args.debug:
            raise
        message = f"internal error: {type(e).__name__}: {shown(e, limit=None)} (rerun with --debug)"
        message = f"vqkit: {message}"
        print(message, file=sys.stderr)
        return 1
