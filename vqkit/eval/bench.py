"""``vqkit bench``: the model and the baselines on the same clips, in one run, scored alike.

Every system runs on every clip; each output is scored against the clip at the model's rate (the
reference). Narrow-band systems (Codec 2) are scored with PESQ-NB and STOI at 8 kHz and with
PESQ-WB on their output upsampled to the reference rate; the others with PESQ-NB on their output
downsampled to 8 kHz and STOI and PESQ-WB at the reference rate. Bitrates are measured from the
bytes each system wrote: ``kbps`` from the codec payload (container and file headers excluded),
``kbps_file`` from the whole file. Speeds are real-time factors (seconds / audio seconds).
"""

from __future__ import annotations

import csv
import dataclasses
import fnmatch
import io
import os
import platform
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from vqkit.audio.io import fix_length, native_rates, read_audio, resample, write_audio
from vqkit.errors import VqkitError
from vqkit.eval import metrics, perceptual
from vqkit.eval.baselines import (
    BASELINES,
    CODEC2_MAX_LAG,
    Model,
    Output,
    System,
    find_delay,
    make_baselines,
    shift,
)
from vqkit.files import atomic_write_bytes, check_output, write_json
from vqkit.run import SHIPPED, RunFolder, model_for_rate, resolve_model

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")
NB_RATE = 8000
SUMMARY_KEYS = ("kbps", "kbps_file", "pesq_nb", "pesq_wb", "stoi", "lsd_db", "rtf_encode")
SUMMARY_KEYS += ("rtf_decode", "mel_db", "sd_mel_db2", "sd_ratek_db2", "si_sdr_db")
SUMMARY_KEYS += perceptual.PERCEPTUAL_KEYS
METRIC_KEYS = (*SUMMARY_KEYS, "mse")  # every key a clip row scores
TABLE_KEYS = ("kbps", "pesq_nb", "pesq_wb", "stoi", "visqol", "dnsmos_ovrl", "lsd_db")
TABLE_KEYS += ("rtf_encode", "rtf_decode")
ORIGINAL = "original"  # the row of the references themselves: each metric's ceiling
# DNSMOS costs about 1.2 s of CPU a clip (ViSQOL 0.12 s): the demo, which should take about a
# minute, runs it on the references and the systems its README table compares only.
DEMO_DNSMOS = ("original", "codec2-1200", "codec2-3200", "opus-8k")  # and the shipped model at:
DEMO_DNSMOS_KBPS = (1.3, 3.2)  # the most stages within each
SCORING = (
    "Reference: each clip at {rate} Hz. Narrow-band systems ({nb}) are scored with PESQ-NB and "
    "STOI at 8 kHz, and with PESQ-WB and the spectral distances on their output upsampled to "
    "{rate} Hz (so their empty upper band counts); the others with PESQ-NB on their output "
    "downsampled to 8 kHz and everything else at {rate} Hz. kbps counts the codec payload (Ogg "
    "pages and file headers excluded), kbps_file the whole file. Real-time factors are seconds "
    "per second of audio, torch on {threads} thread(s). ViSQOL (v3, speech mode, lattice "
    "mapper) and DNSMOS (P.835 SIG/BAK/OVRL and P.808) score every output resampled to 16 kHz "
    "(DNSMOS needs no reference; its 'original' row is the references' own score); DNSMOS on: "
    "{dnsmos}."
)


def list_clips(audio_dir: str | os.PathLike) -> list[Path]:
    """The audio files directly in ``audio_dir`` (wav, flac, ogg), sorted by name."""
    root = Path(audio_dir)
    if not root.is_dir():
        raise VqkitError(f"{root} is not a folder of audio clips")
    paths = sorted(p for p in root.iterdir() if p.suffix.lower() in AUDIO_EXTENSIONS)
    if not paths:
        raise VqkitError(f"{root} holds no {', '.join(AUDIO_EXTENSIONS)} files")
    return paths


def score(
    ref: np.ndarray, rate: int, output: Output, narrowband: bool, dnsmos: bool = True
) -> dict[str, Any]:
    """All metrics of one output against its reference ``ref`` ``(T,)`` at ``rate``, the output
    first resampled to ``rate`` and cut to the reference's length; a metric that fails is
    recorded as ``{"error": reason}``, DNSMOS as None unless ``dnsmos``."""
    ref_nb = resample(ref, rate, NB_RATE)
    deg = fix_length(resample(output.wave, output.sample_rate, rate), ref.shape[0])
    deg_nb = output.wave if output.sample_rate == NB_RATE else resample(deg, rate, NB_RATE)
    deg_nb = fix_length(deg_nb, ref_nb.shape[0])
    t = metrics.try_metric
    stoi_args = (ref_nb, deg_nb, NB_RATE) if narrowband else (ref, deg, rate)
    return {
        "pesq_nb": t(metrics.pesq_nb, ref_nb, deg_nb, NB_RATE),
        "pesq_wb": t(metrics.pesq_wb, ref, deg, rate),
        "stoi": t(metrics.stoi, *stoi_args),
        "lsd_db": t(metrics.log_spectral_distance_db, ref, deg),
        **metrics.spectral_distances(ref, deg, rate),
        "si_sdr_db": t(metrics.si_sdr, ref, deg),
        "mse": t(metrics.mse, ref, deg),
        **perceptual.perceptual_scores(ref, deg, rate, dnsmos=dnsmos),
    }


def _original_rows(
    clips: list[tuple[str, np.ndarray]], rate: int, dnsmos: bool
) -> list[dict[str, Any]]:
    """The references scored against themselves (PESQ, STOI, ViSQOL) and alone (DNSMOS): each
    metric's ceiling on these clips. Distances are left out (trivially zero)."""
    rows = []
    for name, ref in clips:
        ref_nb = resample(ref, rate, NB_RATE)
        row: dict[str, Any] = {"system": ORIGINAL, "family": ORIGINAL, "clip": name}
        row.update(dict.fromkeys(METRIC_KEYS), duration_s=ref.shape[0] / rate)
        row.update(
            pesq_nb=metrics.try_metric(metrics.pesq_nb, ref_nb, ref_nb, NB_RATE),
            pesq_wb=metrics.try_metric(metrics.pesq_wb, ref, ref, rate),
            stoi=metrics.try_metric(metrics.stoi, ref, ref, rate),
            **perceptual.perceptual_scores(ref, ref, rate, dnsmos=dnsmos),
            audio=f"audio/{name}--{ORIGINAL}.wav",
        )
        rows.append(row)
    return rows


def wants_dnsmos(system: str, patterns: Sequence[str] | None) -> bool:
    """Whether DNSMOS scores ``system``: every system when ``patterns`` is None, else those
    matching one of the shell-style ``patterns`` ("vqkit-*", "original")."""
    return patterns is None or any(fnmatch.fnmatchcase(system, p) for p in patterns)


def _run_clips(
    system: System, clips: list[tuple[str, np.ndarray]], rate: int
) -> tuple[list[Output | str], int | None]:
    """Run ``system`` on every clip (an error message stands for a failed run), then remove its
    fixed delay when it has one. Returns the outputs and the delay (samples at output rate)."""
    outputs: list[Output | str] = []
    for _, wave in clips:
        try:
            outputs.append(system.run(wave, rate))
        except (RuntimeError, ValueError, VqkitError) as e:
            outputs.append(str(e) or type(e).__name__)
    done = [(c, o) for c, o in zip(clips, outputs, strict=True) if isinstance(o, Output)]
    if not system.needs_alignment or not done:
        return outputs, None
    out_rate = done[0][1].sample_rate
    refs = [resample(wave, rate, out_rate) for (_, wave), _ in done]
    lag = find_delay(refs, [o.wave for _, o in done], out_rate, CODEC2_MAX_LAG)
    aligned = [
        dataclasses.replace(o, wave=shift(o.wave, lag, o.wave.shape[0]))
        if isinstance(o, Output)
        else o
        for o in outputs
    ]
    return aligned, lag


def _clip_row(
    system: System,
    name: str,
    ref: np.ndarray,
    rate: int,
    out: Output | str,
    audio: str | None,
    dnsmos: bool,
) -> dict[str, Any]:
    seconds = ref.shape[0] / rate
    row: dict[str, Any] = {"system": system.name, "family": system.family, "clip": name}
    row["duration_s"] = seconds
    if isinstance(out, str):
        failed = {"error": out}
        return {**row, "error": out, **dict.fromkeys(METRIC_KEYS, failed), "audio": None}

    def kbps(n_bytes: int | None) -> float | None:
        return None if n_bytes is None else n_bytes * 8 / seconds / 1000

    row.update(kbps=kbps(out.payload_bytes), kbps_file=kbps(out.n_bytes))
    row.update(rtf_encode=out.encode_seconds / seconds, rtf_decode=out.decode_seconds / seconds)
    try:
        row.update(score(ref, rate, out, system.narrowband, dnsmos))
    except (ValueError, RuntimeError, VqkitError) as e:  # too short to compare, say
        scores = [k for k in METRIC_KEYS if not k.startswith(("kbps", "rtf"))]
        row.update(dict.fromkeys(scores, {"error": str(e) or type(e).__name__}))
    row["audio"] = audio
    return row


def summarise_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per system (in first-seen order): for each key its mean, ``_std`` and, where some
    clips failed, ``_failed`` (the count) and, where all failed for one reason, ``_error``."""
    summary = []
    for system in dict.fromkeys(r["system"] for r in rows):
        mine = [r for r in rows if r["system"] == system]
        row: dict[str, Any] = {"system": system, "family": mine[0]["family"], "clips": len(mine)}
        for key in SUMMARY_KEYS:
            scores = [r.get(key) for r in mine]
            stats = metrics.summarise(scores)
            row[key], row[f"{key}_std"] = stats["mean"], stats["std"]
            if stats["n_failed"]:
                row[f"{key}_failed"] = stats["n_failed"]
            reasons = {s["error"] for s in scores if metrics.is_failed(s)}
            if stats["n"] == 0 and len(reasons) == 1:
                row[f"{key}_error"] = reasons.pop()
        summary.append(row)
    return summary


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def clip_names(paths: Sequence[Path]) -> list[str]:
    """A file-safe name per clip, unique even where names clean up alike (``a b.wav``,
    ``a_b.wav`` and ``a_b.flac`` become ``a_b``, ``a_b-2``, ``a_b-3``), also on file systems
    that ignore case."""
    names: list[str] = []
    taken: set[str] = set()
    for path in paths:
        base = _safe(path.stem)
        name, n = base, 1
        while name.lower() in taken:
            n += 1
            name = f"{base}-{n}"
        taken.add(name.lower())
        names.append(name)
    return names


def read_clips(
    paths: Sequence[Path], rate: int
) -> tuple[list[tuple[str, np.ndarray]], dict[str, str], list[dict[str, str]]]:
    """The clips that can be read, as ``(name, wave at rate)``; each name's file; and the files
    that cannot be read, each with its reason (one bad file does not sink a bench)."""
    clips, files, unread = [], {}, []
    for path, name in zip(paths, clip_names(paths), strict=True):
        try:
            clips.append((name, read_audio(path, rate)[0]))
            files[name] = path.name
        except VqkitError as e:
            unread.append({"file": path.name, "reason": str(e)})
    if not clips:
        raise VqkitError(f"no clip could be read: {unread[0]['reason']}")
    return clips, files, unread


def _codebook_stats(codes: list[np.ndarray], codec: Any) -> dict[str, Any] | None:
    """Per-stage usage, perplexity and code counts of the model's codes on the bench clips."""
    if not codes:
        return None
    size = int(codec.codebook_size)
    counts = metrics.code_counts(codes, size)
    return {
        "codebook_size": size,
        "usage": metrics.codebook_usage(codes, size).tolist(),
        "perplexity": metrics.codebook_perplexity(codes, size).tolist(),
        "counts": counts.tolist(),
    }


def _run_all(
    systems: list[System],
    clips: list[tuple[str, np.ndarray]],
    rate: int,
    out: Path,
    progress: bool,
    dnsmos: Sequence[str] | None,
) -> tuple[list[dict[str, Any]], dict[str, int], dict[str, list[Output | str]]]:
    """Score the references, then run and score every system on every clip (DNSMOS where
    ``dnsmos`` asks), writing each output to ``OUT/audio``.

    Returns the clip rows, the delays removed per system, and the outputs per system."""
    rows, delays, outputs = _original_rows(clips, rate, wants_dnsmos(ORIGINAL, dnsmos)), {}, {}
    with tqdm(
        total=len(systems) * len(clips), desc="bench", unit="run", disable=not progress
    ) as bar:
        for system in systems:
            bar.set_postfix_str(system.name)
            outputs[system.name], lag = _run_clips(system, clips, rate)
            if lag is not None:
                delays[system.name] = lag
            for (name, wave), output in zip(clips, outputs[system.name], strict=True):
                audio = None
                if isinstance(output, Output):
                    audio = f"audio/{name}--{_safe(system.name)}.wav"
                    write_audio(out / audio, output.wave, output.sample_rate)
                wanted = wants_dnsmos(system.name, dnsmos)
                rows.append(_clip_row(system, name, wave, rate, output, audio, wanted))
                bar.update(1)
    return rows, delays, outputs


def run_bench(
    audio_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    model: str | os.PathLike = "default",
    bitrates: Sequence[float] | None = None,
    baselines: Sequence[str] = BASELINES,
    progress: bool = True,
    dnsmos: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run the model at ``bitrates`` (default: all it offers) and the ``baselines`` on every clip
    of ``audio_dir``; write ``OUT/results.json``, ``results.csv`` (summary), ``clips.csv``,
    ``audio/`` and ``report.html``. Returns the results as written. DNSMOS scores the systems
    ``dnsmos`` names (see :func:`wants_dnsmos`; None: all), ViSQOL every one.

    The model runs on the caller's torch threads (``vqkit bench`` sets ``--threads``, default 1,
    which makes its real-time factors comparable with the single-threaded Codec 2 and Opus).
    """
    check_output(out, audio_dir, *([] if os.fspath(model) in SHIPPED else [model]))
    return _bench(Path(audio_dir), Path(out), model, bitrates, baselines, progress, dnsmos)


def _bench(
    audio_dir: Path,
    out: Path,
    model: str | os.PathLike,
    bitrates: Sequence[float] | None,
    baselines: Sequence[str],
    progress: bool,
    dnsmos: Sequence[str] | None,
) -> dict[str, Any]:
    from vqkit.codec.codec import load_codec
    from vqkit.eval.report import write_report

    paths = list_clips(audio_dir)
    rates = native_rates(paths)  # all at 8 kHz or below: "default" is the narrowband model
    codec = load_codec(model_for_rate(model, max(rates)) if rates else model)
    rate = int(codec.sample_rate)
    clips, files, unread = read_clips(paths, rate)
    for name, wave in clips:
        write_audio(out / "audio" / f"{name}--original.wav", wave, rate)
    # A requested bitrate means the most stages that fit in it (an error when none does).
    offered = list(codec.bitrates)
    chosen = offered if bitrates is None else [offered[codec.n_stages(b) - 1] for b in bitrates]
    systems = [Model(codec, float(b)) for b in sorted(set(chosen))]
    if systems:
        systems[0].warm_up(rate)
    extra, skipped = make_baselines(list(baselines), codec)
    narrowband = ", ".join(dict.fromkeys(s.family for s in extra if s.narrowband)) or "none"
    rows, delays, outputs = _run_all([*systems, *extra], clips, rate, out, progress, dnsmos)
    top = max(systems, key=lambda s: s.kbps, default=None)
    codes = [o.codes for o in outputs.get(top.name if top else "", []) if isinstance(o, Output)]
    results = {
        "format": "vqkit-bench",
        "version": 1,
        "audio_dir": str(audio_dir.resolve()),
        "sample_rate": rate,
        "scoring": SCORING.format(
            rate=rate,
            nb=narrowband,
            threads=torch.get_num_threads(),
            dnsmos="every system" if dnsmos is None else ", ".join(dnsmos) or "none",
        ),
        "model": _model_info(codec, model),
        "tools": {t: shutil.which(t) for t in ("c2enc", "c2dec", "opusenc", "opusdec")},
        "skipped": skipped,
        "unread": unread,
        "files": files,
        "delays": delays,
        "machine": _machine(),
        "clips": rows,
        "summary": summarise_rows(rows),
        "codebook": _codebook_stats(codes, codec),
    }
    results["report"] = write_report(out, results).name
    write_json(out / "results.json", results)
    atomic_write_bytes(out / "results.csv", to_csv(results["summary"]).encode())
    atomic_write_bytes(out / "clips.csv", to_csv(rows).encode())
    return results


def _model_info(codec: Any, model: str | os.PathLike) -> dict[str, Any]:
    """Where the model came from, and its run folder when it is a run's checkpoint."""
    path = resolve_model(model)
    folder = RunFolder.of(model, path)
    run = str(folder.root.resolve()) if folder else None
    return {
        "name": str(model),
        "path": str(path.resolve()),
        "model_id": codec.model_id,
        "bitrates": [float(b) for b in codec.bitrates],
        "run": run,
        "meta": codec.checkpoint.meta,
    }


def _machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def to_csv(rows: list[dict[str, Any]]) -> str:
    """Rows as CSV text; a failed metric is an empty cell, its reason goes to ``errors``."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, [*keys, "errors"], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        flat = {k: "" if metrics.is_failed(v) else v for k, v in row.items()}
        failed = [f"{k}: {v['error']}" for k, v in row.items() if metrics.is_failed(v)]
        writer.writerow({**flat, "errors": "; ".join(dict.fromkeys(failed))})
    return buffer.getvalue()


def format_table(summary: list[dict[str, Any]]) -> str:
    """The summary as a fixed-width text table: mean ± std per key, '-' where nothing scored."""

    def cell(row: dict[str, Any], key: str) -> str:
        mean, std = row.get(key), row.get(f"{key}_std")
        if mean is None:
            return metrics.failure_label(row.get(f"{key}_error"))
        digits = 4 if key.startswith("rtf") else 3 if key == "stoi" else 2
        text = f"{mean:.{digits}f}±{std:.{digits}f}" if key != "kbps" else f"{mean:.2f}"
        return text + (f" ({row[f'{key}_failed']} failed)" if row.get(f"{key}_failed") else "")

    header = ["system", *TABLE_KEYS]
    body = [[row["system"], *(cell(row, k) for k in TABLE_KEYS)] for row in summary]
    widths = [max(len(str(line[i])) for line in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(str(v).ljust(w) for v, w in zip(line, widths, strict=True))
        for line in [header, *body]
    ]
    return "\n".join(line.rstrip() for line in lines)


def demo(out: str | os.PathLike = "demo-out", *, progress: bool = True) -> dict[str, Any]:
    """The shipped model and every available baseline on the bundled sample of held-out speech
    (``vqkit/assets/sample``); returns the results (``results["report"]`` is the report)."""
    import importlib.resources

    sample = Path(str(importlib.resources.files("vqkit") / "assets" / "sample"))
    if not sample.is_dir():
        raise VqkitError(f"the bundled speech sample is missing ({sample}); reinstall vqkit")
    from vqkit.codec.codec import load_codec

    codec = load_codec("default")
    offered = [codec.bitrates[codec.n_stages(kbps) - 1] for kbps in DEMO_DNSMOS_KBPS]
    dnsmos = (*DEMO_DNSMOS, *(Model(codec, float(kbps)).name for kbps in offered))
    return run_bench(sample, out, model="default", progress=progress, dnsmos=dnsmos)
