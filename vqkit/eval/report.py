"""The bench report: one self-contained folder with ``report.html``, PNG plots under ``plots/`` and
the audio under ``audio/``. No scripts or styles from outside; relative links only.

Plots use matplotlib's Agg canvas directly (no pyplot, no global state).
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vqkit.audio.io import read_audio
from vqkit.audio.stft import stft
from vqkit.errors import VqkitError
from vqkit.eval import metrics
from vqkit.files import atomic_path, atomic_write_bytes, new_figure, save_figure
from vqkit.run import RunFolder

QUALITY_KEYS = (("pesq_nb", "PESQ-NB"), ("pesq_wb", "PESQ-WB"), ("stoi", "STOI"))
QUALITY_KEYS += (("visqol", "ViSQOL (MOS-LQO)"), ("dnsmos_ovrl", "DNSMOS OVRL"))
LINES = {"original": ("-", "black"), "oracle": ("--", "grey")}  # systems without a bitstream
TABLE_KEYS = (
    ("kbps", "kbit/s", 2),
    ("kbps_file", "kbit/s file", 2),
    ("pesq_nb", "PESQ-NB", 2),
    ("pesq_wb", "PESQ-WB", 2),
    ("stoi", "STOI", 3),
    ("visqol", "ViSQOL", 2),
    ("dnsmos_sig", "DNSMOS SIG", 2),
    ("dnsmos_bak", "DNSMOS BAK", 2),
    ("dnsmos_ovrl", "DNSMOS OVRL", 2),
    ("dnsmos_p808", "DNSMOS P.808", 2),
    ("lsd_db", "LSD dB", 2),
    ("mel_db", "mel dB", 2),
    ("si_sdr_db", "SI-SDR dB", 1),
    ("rtf_encode", "RTF enc", 4),
    ("rtf_decode", "RTF dec", 4),
)
SPEC_N_FFT, SPEC_HOP = 512, 128
STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 1400px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
img { max-width: 100%; }
audio { width: 220px; height: 32px; }
.clip { display: flex; gap: 1em; align-items: flex-start; }
.clip img { flex: 1; min-width: 0; }
.note { color: #555; max-width: 70em; }
"""
# Turns a broken image or audio source into a console error, so a headless browser check sees it.
RESOURCE_CHECK = """
function fail(e) { console.error("failed to load: " + (e.currentSrc || e.src)); }
document.querySelectorAll("img").forEach(function (e) {
  if (e.complete && e.naturalWidth === 0) { fail(e); }
  else { e.addEventListener("error", function () { fail(e); }); }
});
document.querySelectorAll("audio").forEach(function (e) {
  if (e.error) { fail(e); } else { e.addEventListener("error", function () { fail(e); }); }
});
"""


def _figure(width: float, height: float) -> Any:
    return new_figure(width, height, dpi=80)


def _save(figure: Any, path: Path) -> None:
    figure.tight_layout()
    save_figure(figure, path)


def plot_quality(summary: list[dict[str, Any]], path: Path) -> None:
    """One panel per metric of ``QUALITY_KEYS`` against measured kbit/s, one curve per system
    family; systems without a bitstream (the original, the oracle) are horizontal lines. A
    metric no system scored leaves its panel empty, titled with the reason."""
    figure = _figure(14, 8)
    families = list(dict.fromkeys(r["family"] for r in summary))
    colours = {f: f"C{i}" for i, f in enumerate(f for f in families if f not in LINES)}
    for i, (key, label) in enumerate(QUALITY_KEYS):
        axes = figure.add_subplot(2, 3, i + 1)
        for family in families:
            rows = [r for r in summary if r["family"] == family and r.get(key) is not None]
            points = sorted((r["kbps"], r[key]) for r in rows if r.get("kbps") is not None)
            if points:
                x, y = zip(*points, strict=True)
                axes.plot(x, y, "o-", color=colours.get(family), label=family, markersize=4)
            for row in (r for r in rows if r.get("kbps") is None):
                style, colour = LINES.get(family, (":", colours.get(family)))
                axes.axhline(row[key], linestyle=style, color=colour, label=row["system"])
        if not axes.get_lines():
            reason = next((r[f"{key}_error"] for r in summary if r.get(f"{key}_error")), None)
            axes.set_title(metrics.failure_label(reason), fontsize=9)
        axes.set_xlabel("measured kbit/s (payload)")
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
    legend = figure.add_subplot(2, 3, 6)
    legend.axis("off")
    handles = {h.get_label(): h for a in figure.axes for h in a.get_lines()}
    if handles:
        legend.legend(list(handles.values()), list(handles), loc="center", fontsize=10)
    _save(figure, path)


def _spectrogram_db(wave: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(np.asarray(wave, dtype=np.float32))
    spec = stft(x, SPEC_N_FFT, SPEC_HOP).abs()
    return (20 * torch.log10(spec.clamp(min=1e-5))).numpy()  # (F, N)


def plot_spectrograms(waves: list[tuple[str, np.ndarray]], sample_rate: int, path: Path) -> None:
    """Log-magnitude spectrograms of one clip, original first, two columns; every wave is at
    ``sample_rate`` (narrow-band outputs upsampled, so their empty upper band shows)."""
    n_cols = 2 if len(waves) > 1 else 1
    n_rows = math.ceil(len(waves) / n_cols)
    height = 1.5 * n_rows + 0.5
    figure = _figure(14, height)
    # Fixed margins: tight_layout costs more than drawing on a grid of many panels.
    figure.subplots_adjust(
        left=0.05, right=0.99, top=1 - 0.3 / height, bottom=0.3 / height, hspace=0.5, wspace=0.1
    )
    top = None
    for i, (name, wave) in enumerate(waves):
        axes = figure.add_subplot(n_rows, n_cols, i + 1)
        db = _spectrogram_db(wave)
        top = db.max() if top is None else top  # one colour scale, the original's
        extent = (0.0, wave.shape[0] / sample_rate, 0.0, sample_rate / 2000)
        axes.imshow(
            db,
            origin="lower",
            aspect="auto",
            extent=extent,
            vmin=top - 80,
            vmax=top,
            interpolation="nearest",
        )
        axes.set_title(name, fontsize=9, loc="left")
        axes.set_ylabel("kHz", fontsize=8)
        axes.tick_params(labelsize=7)
    with atomic_path(path) as tmp:  # light compression: zlib dominates saving large images
        figure.savefig(tmp, format="png", pil_kwargs={"compress_level": 1})


def plot_codebook(codebook: dict[str, Any], path: Path) -> None:
    """Per-stage code counts on the bench clips (codes sorted by count), usage and perplexity."""
    counts = np.asarray(codebook["counts"])
    n_cols = min(4, counts.shape[0])
    n_rows = math.ceil(counts.shape[0] / n_cols)
    figure = _figure(14, 2.2 * n_rows + 0.3)
    for q, row in enumerate(counts):
        axes = figure.add_subplot(n_rows, n_cols, q + 1)
        ranked = np.sort(row)[::-1]  # a rank-frequency curve: flat when codes are used evenly
        axes.fill_between(np.arange(ranked.size), ranked, step="post", linewidth=0.8)
        usage, perplexity = codebook["usage"][q], codebook["perplexity"][q]
        axes.set_title(
            f"stage {q + 1}: {100 * usage:.0f}% used, perplexity {perplexity:.0f}", fontsize=9
        )
        axes.set_xlabel("code (by count)", fontsize=8)
        axes.tick_params(labelsize=7)
    _save(figure, path)


def _training_plot(model: dict[str, Any], plots: Path) -> str | None:
    """The model's training curves as ``plots/training.png``: from the run's metrics.jsonl, else
    the checkpoint meta's ``curves`` rows, else a copy of the run's loss.png. None when absent."""
    from vqkit.train.log import plot_losses, read_metrics

    run = RunFolder(Path(model["run"])) if model.get("run") else None
    rows = model.get("meta", {}).get("curves")
    if run is not None and run.metrics.is_file():
        rows = read_metrics(run.metrics)
    target = plots / "training.png"
    if isinstance(rows, list) and rows:
        key = "recon" if any("recon" in r for r in rows) else "loss"
        plot_losses(rows, target, key=key)
        return "plots/training.png"
    if run is not None and run.loss_plot.is_file():
        atomic_write_bytes(target, run.loss_plot.read_bytes())
        return "plots/training.png"
    return None


def _cell(row: dict[str, Any], key: str, digits: int) -> str:
    mean = row.get(key)
    if mean is None:
        return metrics.failure_label(row.get(f"{key}_error"))
    text = f"{mean:.{digits}f}"
    if row.get(f"{key}_std") is not None and not key.startswith("kbps"):
        text += f" ± {row[f'{key}_std']:.{digits}f}"
    if row.get(f"{key}_failed"):
        text += f" ({row[f'{key}_failed']} failed)"
    return text


def _summary_table(summary: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{label}</th>" for _, label, _ in TABLE_KEYS)
    body = "".join(
        f"<tr><td>{html.escape(r['system'])}</td>"
        + "".join(f"<td>{_cell(r, k, d)}</td>" for k, _, d in TABLE_KEYS)
        + "</tr>"
        for r in summary
    )
    return f"<table><tr><th>system</th>{head}</tr>{body}</table>"


def _players(clip: str, rows: list[dict[str, Any]]) -> str:
    """A table of audio players for one clip: the original, then every system."""
    items = [("original", f"audio/{clip}--original.wav")]
    items += [
        (r["system"], r["audio"])
        for r in rows
        if r["clip"] == clip and r.get("audio") and r["family"] != "original"
    ]
    cells = "".join(
        f'<tr><td>{html.escape(name)}</td><td><audio controls preload="metadata" '
        f'src="{html.escape(src)}"></audio></td></tr>'
        for name, src in items
    )
    return f"<table>{cells}</table>"


def _clip_section(out: Path, clip: str, results: dict[str, Any]) -> str:
    """One clip's players and spectrograms; a plot that fails is recorded in
    ``results["report_errors"]`` and named on the page, and the report goes on."""
    rate = results["sample_rate"]
    rows = [r for r in results["clips"] if r["clip"] == clip]
    image = f"plots/spectrogram--{clip}.png"
    try:
        waves = [("original", read_audio(out / "audio" / f"{clip}--original.wav", rate)[0])]
        waves += [
            (r["system"], read_audio(out / r["audio"], rate)[0])
            for r in rows
            if r["audio"] and r["family"] != "original"
        ]
        plot_spectrograms(waves, rate, out / image)
        picture = f'<img src="{html.escape(image)}" alt="spectrograms of {html.escape(clip)}">'
    except (ValueError, RuntimeError, VqkitError) as e:
        reason = str(e) or type(e).__name__
        results.setdefault("report_errors", []).append({"clip": clip, "reason": reason})
        picture = f'<p class="note">No spectrograms: {html.escape(reason)}</p>'
    return f'<h3>{html.escape(clip)}</h3><div class="clip">{_players(clip, rows)}{picture}</div>'


def _notes(results: dict[str, Any]) -> str:
    parts = [f'<p class="note">{html.escape(results["scoring"])}</p>']
    for skip in results.get("skipped", []):
        parts.append(
            f'<p class="note">Skipped {html.escape(skip["system"])}: '
            f"{html.escape(skip['reason'])}</p>"
        )
    for unread in results.get("unread", []):
        parts.append(
            f'<p class="note">Not scored, {html.escape(unread["file"])}: '
            f"{html.escape(unread['reason'])}</p>"
        )
    if results.get("delays"):
        lags = ", ".join(f"{k} {v}" for k, v in results["delays"].items())
        parts.append(
            f'<p class="note">Fixed delays removed (samples at the output rate, found once per '
            f"system on these clips): {html.escape(lags)}</p>"
        )
    machine = results.get("machine", {})
    parts.append(
        f'<p class="note">Machine: {html.escape(str(machine.get("platform")))}, '
        f"{machine.get('cpu_count')} CPUs, {machine.get('torch_threads')} torch threads.</p>"
    )
    return "".join(parts)


def _listening(out: Path) -> str:
    """The listening test's section: a link to the test (``vqkit listen``) and, once ratings
    are aggregated, its results; empty when there is no test."""
    if not (out / "listen" / "index.html").is_file():
        return ""
    parts = [
        "<h2>Listening test (MUSHRA, ITU-R BS.1534)</h2>",
        '<p><a href="listen/index.html">the blind listening test</a>: send the folder '
        "<code>listen/</code> to listeners, then <code>vqkit listen BENCH_OUT --ratings "
        "FILE...</code>.</p>",
    ]
    if (out / "listen" / "listening.png").is_file():
        parts.append(
            '<p><a href="listen/listening.csv">listening.csv</a> (mean and 95 % confidence '
            'interval per condition, after post-screening)</p><img src="listen/listening.png" '
            'alt="listening test results">'
        )
    return "".join(parts)


def write_report(out: str | Path, results: dict[str, Any]) -> Path:
    """Write ``OUT/report.html`` and its plots from bench ``results``; the audio it links to
    must already be in ``OUT/audio``. Returns the report's path."""
    out = Path(out)
    plots = out / "plots"
    plot_quality(results["summary"], plots / "quality.png")
    model = results["model"]
    sections = [
        f"<h1>vqkit bench: {html.escape(model['name'])} ({html.escape(model['model_id'])})</h1>",
        f"<p>{len(dict.fromkeys(r['clip'] for r in results['clips']))} clips from "
        f"{html.escape(results['audio_dir'])}</p>",
        "<h2>Summary (mean ± std over clips)</h2>",
        _summary_table(results["summary"]),
        _notes(results),
        '<h2>Quality against bitrate</h2><img src="plots/quality.png" alt="quality">',
    ]
    training = _training_plot(model, plots)
    sections.append("<h2>Training curves</h2>")
    sections.append(
        f'<img src="{training}" alt="training curves">'
        if training
        else '<p class="note">No training curves: the model is neither a run with '
        "metrics.jsonl nor a checkpoint with curves in its meta.</p>"
    )
    if results.get("codebook"):
        plot_codebook(results["codebook"], plots / "codebook.png")
        sections.append(
            "<h2>Codebook usage on these clips (highest bitrate)</h2>"
            '<img src="plots/codebook.png" alt="codebook usage">'
        )
    sections.append(_listening(out))
    sections.append("<h2>Clips</h2>")
    for clip in dict.fromkeys(r["clip"] for r in results["clips"]):
        sections.append(_clip_section(out, clip, results))
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<link rel="icon" href="data:,">'
        f"<title>vqkit bench</title><style>{STYLE}</style></head><body>"
        + "\n".join(sections)
        + f"<script>{RESOURCE_CHECK}</script></body></html>\n"
    )
    path = out / "report.html"
    atomic_write_bytes(path, page.encode())
    return path
