"""``vqkit listen``: a blind MUSHRA listening test (ITU-R BS.1534) built from a bench folder.

:func:`write_test` writes ``BENCH_OUT/listen/index.html`` (one self-contained page: no scripts,
styles or fonts from elsewhere) and ``BENCH_OUT/listen/audio/TRIAL.js``, one per clip: every
condition of that trial as a 16-bit WAV in base64, so the page reads it into Web Audio from a
``file://`` URL too (browsers refuse ``fetch`` there). A trial is one clip: the open reference,
and, in an order shuffled per listener and per trial, the hidden reference, the 3.5 kHz low-pass
anchor, the 7 kHz mid anchor and the systems, every one at the reference's rate and length.
The page keeps the ratings in the browser's storage and saves them as JSON
(``format: vqkit-listening``); :func:`listen` with ``ratings`` aggregates those files
(:mod:`vqkit.eval.mushra`) into ``listening.csv`` and ``listening.png`` beside the page, and the
bench report links the test and its results.
"""

from __future__ import annotations

import base64
import hashlib
import html
import importlib.resources
import io
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from vqkit.audio.io import fix_length, read_audio, resample
from vqkit.errors import VqkitError
from vqkit.eval import mushra
from vqkit.eval.mushra import ANCHORS, HIDDEN
from vqkit.files import atomic_write_bytes, read_json, write_json

REFERENCE = "reference"  # the open reference; HIDDEN is the same audio rated blind
MAX_CONDITIONS = 12  # BS.1534 advises at most 12 conditions besides the open reference


def read_bench(bench_out: str | Path) -> dict[str, Any]:
    """The ``results.json`` of a bench folder, checked for what the listening test needs."""
    path = Path(bench_out) / "results.json"
    if not path.is_file():
        raise VqkitError(f"{path} not found: run `vqkit bench AUDIO_DIR --out {bench_out}` first")
    results = read_json(path)
    if not isinstance(results, dict) or results.get("format") != "vqkit-bench":
        raise VqkitError(f"{path} is not a vqkit bench result")
    return results


def choose_systems(results: dict[str, Any], systems: Sequence[str] | None) -> list[str]:
    """The systems to test: ``systems`` (checked against the bench), else every system the bench
    wrote audio for (every vqkit rate and the baselines)."""
    rows = [r for r in results["clips"] if r.get("audio") and r.get("family") != "original"]
    offered = list(dict.fromkeys(r["system"] for r in rows))
    if systems is None:
        return offered
    unknown = [s for s in systems if s not in offered]
    if unknown:
        raise VqkitError(
            f"unknown system(s) {', '.join(unknown)}; the bench has: {', '.join(offered)}"
        )
    return list(dict.fromkeys(systems))


def low_pass(x: np.ndarray, sample_rate: int, cutoff: float) -> np.ndarray:
    """``x`` ``(T,)`` band-limited to ``cutoff`` Hz: resampled to ``2 * cutoff`` and back (soxr's
    linear-phase filter, so no delay); ``x`` itself when the cut-off is at or above Nyquist."""
    if 2 * cutoff >= sample_rate:
        return x
    narrow = resample(x, sample_rate, int(2 * cutoff))
    return fix_length(resample(narrow, int(2 * cutoff), sample_rate), x.shape[0])


def _wav_base64(x: np.ndarray, sample_rate: int) -> str:
    buffer = io.BytesIO()
    sf.write(buffer, np.clip(x, -1.0, 1.0), sample_rate, format="WAV", subtype="PCM_16")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def trial_audio(
    bench_out: Path, results: dict[str, Any], clip: str, systems: Sequence[str]
) -> dict[str, np.ndarray]:
    """Every condition of one clip's trial, ``(T,)`` at the reference's rate and length."""
    rate = int(results["sample_rate"])
    ref = read_audio(bench_out / "audio" / f"{clip}--original.wav", rate)[0]
    waves = {REFERENCE: ref}
    waves.update({name: low_pass(ref, rate, cutoff) for name, cutoff in ANCHORS.items()})
    rows = {r["system"]: r for r in results["clips"] if r["clip"] == clip and r.get("audio")}
    for system in systems:
        if system not in rows:
            raise VqkitError(f"the bench has no audio of {system} for clip {clip}")
        wave = read_audio(bench_out / rows[system]["audio"], rate)[0]
        waves[system] = fix_length(wave, ref.shape[0])
    return waves


def write_test(
    bench_out: str | Path, systems: Sequence[str] | None = None
) -> tuple[Path, dict[str, Any]]:
    """Write the listening test into ``BENCH_OUT/listen/``; returns the page and its config."""
    bench_out = Path(bench_out)
    results = read_bench(bench_out)
    chosen = choose_systems(results, systems)
    rate = int(results["sample_rate"])
    anchors = [name for name, cutoff in ANCHORS.items() if 2 * cutoff < rate]
    out = bench_out / "listen"
    if (out / "audio").is_dir():
        shutil.rmtree(out / "audio")
    trials = []
    for clip in dict.fromkeys(r["clip"] for r in results["clips"]):
        waves = trial_audio(bench_out, results, clip, chosen)
        encoded = {name: _wav_base64(waves[name], rate) for name in [REFERENCE, *anchors, *chosen]}
        script = f"window.VQKIT_AUDIO[{json.dumps(clip)}] = {json.dumps(encoded)};\n"
        atomic_write_bytes(out / "audio" / f"{clip}.js", script.encode())
        conditions = [HIDDEN, *anchors, *chosen]
        trials.append({"name": clip, "audio": f"audio/{clip}.js", "conditions": conditions})
    config = {"test": _test_id(results, trials), "sample_rate": rate, "trials": trials}
    write_json(out / "test.json", config)
    page = importlib.resources.files("vqkit").joinpath("assets/listen.html").read_text("utf-8")
    data = json.dumps(config).replace("</", "<\\/")
    page = page.replace("{{CONFIG}}", data).replace("{{TITLE}}", html.escape(bench_out.name))
    atomic_write_bytes(out / "index.html", page.encode())
    return out / "index.html", config


def _test_id(results: dict[str, Any], trials: list[dict[str, Any]]) -> str:
    """A short id of the test (its bench and conditions): ratings of one test never mix with
    another's in the browser's storage."""
    text = json.dumps([results.get("audio_dir"), results.get("model", {}).get("model_id"), trials])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def listen(
    bench_out: str | Path,
    systems: Sequence[str] | None = None,
    ratings: Sequence[str | Path] | None = None,
) -> str:
    """Write the listening test of ``bench_out`` or, given ``ratings`` files, aggregate them
    into ``listen/listening.csv`` and ``listening.png``; re-render the bench report so it links
    both. Returns what to print."""
    from vqkit.eval.report import write_report

    bench_out = Path(bench_out)
    results = read_bench(bench_out)
    out = bench_out / "listen"
    if ratings:
        if not (out / "test.json").is_file():
            raise VqkitError(f"no listening test in {out}: run `vqkit listen {bench_out}` first")
        test = read_json(out / "test.json")["test"]
        kept, dropped = mushra.screen(mushra.read_ratings(ratings, test=test))
        lines = [f"dropped {who}: {why}" for who, why in dropped.items()]
        if not kept:
            raise VqkitError("every listener was screened out: " + "; ".join(lines))
        rows = mushra.aggregate(kept, results)
        paths = mushra.write_outputs(out, rows)
        write_report(bench_out, results)
        listeners = len({r.listener for r in kept})
        lines = [mushra.format_table(rows), f"{listeners} listener(s) kept", *lines]
        return "\n".join([*lines, f"results: {paths[0]}, {paths[1]}"])
    page, config = write_test(bench_out, systems)
    write_report(bench_out, results)
    n = len(config["trials"][0]["conditions"])
    lines = [f"listening test: {page} ({len(config['trials'])} trials, {n} conditions each)"]
    if n > MAX_CONDITIONS:
        lines.append(f"note: BS.1534 advises at most {MAX_CONDITIONS} conditions; see --systems")
    return "\n".join(lines)
