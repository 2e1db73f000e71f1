"""The ``vqkit`` command, the only module that reads ``sys.argv``: each verb calls the API (its
options are in :mod:`vqkit.parser`)."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from vqkit.errors import Interrupted, VqkitError, shown
from vqkit.parser import build_parser


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


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


TRAIN_SUMMARY = ("recon", "objective", "sd_db", "psnr_db", "usage/0")  # the rows' keys printed


def cmd_train(args: argparse.Namespace) -> int:
    from vqkit.config import load_config
    from vqkit.train.loop import train

    config = load_config(args.config, args.overrides)
    with _torch_threads(config.train.threads or None, "train.threads"):  # 0: as they are
        result = train(config, data=args.data, run=args.run, resume=args.resume, init=args.init)
    for split, row in (("val", result.val), ("test", result.test)):
        if row:
            kept = {k: v for k, v in row.items() if k in TRAIN_SUMMARY}
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

        options = (args.model, args.bitrate, args.rate, args.format, args.gain, args.beam)
        info = encode_stream(*_pipe_ends(args), *options)
        print(info, file=sys.stderr if str(args.output) == "-" else sys.stdout)
        return 0
    from vqkit.codec.file_io import encode_file

    info = encode_file(args.input, args.output, args.model, args.bitrate, args.beam)
    print(info)
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    from vqkit.codec.pipes import decode_stream, is_stream

    if "-" in (str(args.input), str(args.output)) or is_stream(args.input):
        info = decode_stream(*_pipe_ends(args), args.model, args.format, args.conceal)
        print(info, file=sys.stderr if str(args.output) == "-" else sys.stdout)
        return 0
    from vqkit.codec.file_io import decode_file

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


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "prepare": cmd_prepare,
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "encode": cmd_encode,
    "decode": cmd_decode,
    "convert": cmd_convert,
    "bench": cmd_bench,
    "listen": cmd_listen,
    "demo": cmd_demo,
    "viz": cmd_viz,
    "pager": cmd_pager,
    "generate": cmd_generate,
    "export": cmd_export,
}


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
            return COMMANDS[args.verb](args)
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
