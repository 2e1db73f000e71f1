"""``vqkit bench`` end to end on tiny clips with a tiny random-weight model, its files, the report
in headless Chromium, and ``vqkit demo``'s wiring."""

from __future__ import annotations

import csv
import itertools
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from browser import needs_chromium, screenshot
from conftest import TINY_BARE_CODEC, load_script, save_random_codec
from test_metrics import speechlike

from vqkit.audio.io import write_audio
from vqkit.cli import main
from vqkit.config import load_config
from vqkit.eval import bench, perceptual
from vqkit.eval.baselines import CODEC2_MODES, OPUS_KBPS

RATE = 16000
N_BINS = 129  # n_fft 256
HAVE_CODEC2 = bool(shutil.which("c2enc") and shutil.which("c2dec"))
HAVE_OPUS = bool(shutil.which("opusenc") and shutil.which("opusdec"))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight 2-stage residual-VQ codec of 16 codes on 129-bin log-magnitudes."""
    config = load_config(
        None,
        [
            "features.n_fft=256",
            "features.hop_length=64",
            *TINY_BARE_CODEC,
            "codec.gl_iters=4",
        ],
    )
    curves = [{"step": s, "split": "train", "recon": 1.0 / s} for s in range(1, 6)]
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    return save_random_codec(path, config, N_BINS, meta={"step": 5, "curves": curves})


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two speech-like clips: WAV at 16 kHz and FLAC at 22.05 kHz, beside a file to ignore."""
    root = tmp_path_factory.mktemp("clips")
    sf.write(root / "one.wav", speechlike(11, 1.2), RATE)
    sf.write(root / "two words.flac", speechlike(12, 1.0, 22050), 22050)
    (root / "notes.txt").write_text("not audio")
    return root


@pytest.fixture(scope="module")
def silent_run(tiny_model: Path, clips: Path, tmp_path_factory: pytest.TempPathFactory):
    """The model, given as a run folder, alone at 0.5 kbit/s on the clips plus 0.5 s of digital
    silence, with the tools taken off PATH; returns (out folder, results)."""
    root = tmp_path_factory.mktemp("silent")
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copyfile(tiny_model, run / "checkpoints" / "best.safetensors")
    rows = [
        {"step": s, "split": split, "recon": 2.0 / s}
        for s in (10, 20)
        for split in ("train", "val")
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.copytree(clips, root / "clips")
    sf.write(root / "clips" / "silence.wav", np.zeros(RATE // 2, np.float32), RATE)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PATH", str(root))  # no c2enc, no opusenc
        results = bench.run_bench(
            root / "clips",
            root / "out",
            model=run,
            bitrates=[0.6],
            baselines=["codec2", "opus"],
            progress=False,
            dnsmos=[],  # ViSQOL only: DNSMOS costs up to 2.6 s a short clip
        )
    return root / "out", results


@pytest.fixture(scope="module")
def bench_run(tiny_model: Path, clips: Path, tmp_path_factory: pytest.TempPathFactory):
    """One CLI bench run with every baseline; returns (out folder, results, printed text)."""
    out = tmp_path_factory.mktemp("bench") / "out"
    argv = ["bench", str(clips), "--out", str(out), "--model", str(tiny_model)]
    # DNSMOS (up to 2.6 s a short clip) on the references only; ViSQOL scores every system.
    argv += ["--dnsmos", "orig*"]
    printed = _run_cli([*argv, "--baselines", "codec2,opus,oracle"])
    return out, json.loads((out / "results.json").read_text()), printed


def _run_cli(argv: list[str]) -> str:
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(argv) == 0
    return buffer.getvalue()


def expected_systems() -> list[str]:
    names = ["vqkit-0.25k", "vqkit-0.50k"]
    names += [f"codec2-{m}" for m in CODEC2_MODES] if HAVE_CODEC2 else []
    names += [f"opus-{k:g}k" for k in OPUS_KBPS] if HAVE_OPUS else []
    return [*names, "oracle-griffinlim"]


def test_bench_runs_every_system_on_every_clip(bench_run):
    out, results, printed = bench_run
    systems = [row["system"] for row in results["summary"]]
    assert systems == ["original", *expected_systems()]
    assert len(results["clips"]) == len(systems) * 2
    for row in results["clips"]:
        assert (out / row["audio"]).is_file()
        if row["system"] != "original":
            assert row["rtf_encode"] > 0 and row["rtf_decode"] > 0
    for name in systems:
        assert name in printed
    assert f"report: {out / 'report.html'}" in printed


def test_bitrates_are_measured_from_the_bytes(bench_run):
    _, results, _ = bench_run
    summary = {row["system"]: row for row in results["summary"]}
    # 16 kHz / hop 64 / 4 = 62.5 code frames/s x 4 bits = 0.25 kbit/s a stage (bytes rounded up).
    assert summary["vqkit-0.50k"]["kbps"] == pytest.approx(0.5, rel=0.1)
    assert summary["vqkit-0.50k"]["kbps_file"] > summary["vqkit-0.50k"]["kbps"]  # the header
    assert summary["oracle-griffinlim"]["kbps"] is None
    if HAVE_CODEC2:
        assert summary["codec2-3200"]["kbps"] == pytest.approx(3.2, rel=0.05)
        assert 100 < results["delays"]["codec2-3200"] < 400
    if HAVE_OPUS:
        assert summary["opus-12k"]["kbps_file"] > summary["opus-12k"]["kbps"]


def test_failed_metrics_are_recorded_and_counted(silent_run):
    out, results = silent_run
    silent = next(r for r in results["clips"] if r["clip"] == "silence")
    assert silent["pesq_wb"] == {"error": "reference is silent"}
    assert isinstance(next(r for r in results["clips"] if r["clip"] == "one")["stoi"], float)
    original, row = results["summary"]
    assert original["system"] == "original" and original["pesq_wb_failed"] == 1
    assert row["pesq_wb_failed"] == 1 and isinstance(row["pesq_wb"], float)
    assert row["pesq_wb_std"] >= 0 and "stoi_failed" in row
    with open(out / "results.csv", newline="") as f:
        _, table = list(csv.DictReader(f))
    assert table["system"] == "vqkit-0.50k" and float(table["pesq_wb"]) == row["pesq_wb"]
    with open(out / "clips.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    silent_row = next(r for r in rows if r["clip"] == "silence")
    assert silent_row["pesq_wb"] == "" and "pesq_wb: reference is silent" in silent_row["errors"]


def test_missing_tools_are_reported_not_fatal(silent_run):
    out, results = silent_run
    systems = [r["system"] for r in results["summary"]]
    assert systems == ["original", "vqkit-0.50k"]  # most stages in 0.6
    assert {s["system"] for s in results["skipped"]} == {"codec2", "opus"}
    assert results["tools"]["c2enc"] is None
    page = (out / "report.html").read_text()
    assert "Skipped codec2: c2enc, c2dec not found on PATH" in page
    # The model is a run: the report plots its metrics.jsonl.
    assert results["model"]["run"] == str(out.parent / "run")
    assert '<img src="plots/training.png"' in page and (out / "plots" / "training.png").is_file()


def test_visqol_scores_every_system_and_dnsmos_those_asked(bench_run):
    out, results, printed = bench_run
    summary = {row["system"]: row for row in results["summary"]}
    if perceptual.missing():  # without the eval extra the columns say so
        assert summary["original"]["visqol_error"].startswith("not installed")
        assert "not installed" in printed
        return
    assert all(isinstance(row["visqol"], float) for row in summary.values())
    assert summary["original"]["visqol"] > summary["vqkit-0.50k"]["visqol"] + 1
    for key in perceptual.DNSMOS_KEYS:
        assert isinstance(summary["original"][key], float)
        assert summary["vqkit-0.50k"][key] is None  # not asked for: not computed
    assert "DNSMOS on: orig*" in results["scoring"]
    page = (out / "report.html").read_text()
    assert "<th>ViSQOL</th>" in page and "<th>DNSMOS P.808</th>" in page


def test_codebook_usage_covers_every_stage(bench_run):
    _, results, _ = bench_run
    codebook = results["codebook"]
    assert codebook["codebook_size"] == 16 and len(codebook["usage"]) == 2
    assert all(0 < u <= 1 for u in codebook["usage"])
    assert all(sum(c) > 0 for c in codebook["counts"])


def test_report_is_a_self_contained_folder(bench_run):
    out, _, _ = bench_run
    page = (out / "report.html").read_text()
    sources = re.findall(r'(?:src|href)="([^"]+)"', page)
    local = [s for s in sources if not s.startswith("data:")]
    assert any(s.endswith("quality.png") for s in local)
    assert any(s.endswith("training.png") for s in local)  # curves from the checkpoint meta
    assert sum(s.endswith(".wav") for s in local) == 2 * (len(expected_systems()) + 1)
    for source in local:
        assert not re.match(r"^[a-z]+://|^/", source), source
        assert (out / source).is_file(), source
    assert "upsampled to 16000 Hz" in page


@needs_chromium
def test_report_loads_in_chromium_without_errors(bench_run, tmp_path):
    out, _, _ = bench_run
    shot = out / "report.png"
    assert screenshot(out / "report.html", shot, tmp_path / "profile") == []
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    # The same check catches a broken audio source: a copy of the report with one file removed.
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "audio" / "one--original.wav").unlink()
    console = screenshot(broken / "report.html", tmp_path / "b.png", tmp_path / "profile2")
    assert any("failed to load" in line and "one--original.wav" in line for line in console)


def test_bench_errors_are_one_line(tiny_model, clips, tmp_path, capsys):
    argv = ["bench", str(clips), "--out", str(tmp_path), "--model", str(tiny_model)]
    assert main([*argv, "--bitrates", "0.1"]) == 1
    assert "below this model's lowest" in capsys.readouterr().err
    assert main([*argv, "--baselines", "opsu"]) == 1
    assert "did you mean 'opus'" in capsys.readouterr().err
    assert main(["bench", str(tmp_path / "none"), "--out", str(tmp_path)]) == 1
    assert "is not a folder of audio clips" in capsys.readouterr().err


def test_demo_benches_the_shipped_model_on_the_bundled_sample(monkeypatch, tmp_path):
    seen = {}

    def fake_run_bench(audio_dir, out, **kwargs):
        seen.update(audio_dir=Path(audio_dir), out=out, **kwargs)
        return {"summary": [], "skipped": [], "report": "report.html"}

    monkeypatch.setattr(bench, "run_bench", fake_run_bench)
    bench.demo(tmp_path)
    assert seen["model"] == "default" and seen["out"] == tmp_path
    clips = bench.list_clips(seen["audio_dir"])
    assert len(clips) >= 2 and all(sf.info(str(c)).samplerate == RATE for c in clips)


def test_read_speech_bench_runs_piper_for_each_sentence_at_16k(tmp_path: Path, capsys) -> None:
    read_bench = load_script("build_read_speech_bench")
    piper = tmp_path / "piper"  # piper's command line: the text on stdin, a 22.05 kHz WAV out
    piper.write_text(
        f"#!{sys.executable}\n"
        "import sys, numpy as np, soundfile as sf\n"
        "argv, text = sys.argv, sys.stdin.read()\n"
        "scale = float(argv[argv.index('--length-scale') + 1])\n"
        "n = int(len(text) * 400 * scale)\n"
        "sf.write(argv[argv.index('-f') + 1], 0.1 * np.sin(np.arange(n) * 0.05), 22050)\n"
    )
    piper.chmod(0o755)
    out = tmp_path / "read"
    assert read_bench.main([str(out), "--voice", "joe.onnx", "--piper", str(piper)]) == 0
    clips = sorted(out.glob("*.wav"))
    assert len(clips) == len(read_bench.SENTENCES)
    for clip, text, speed in zip(clips, read_bench.SENTENCES, itertools.cycle(read_bench.SPEEDS)):
        info = sf.info(str(clip))
        assert info.samplerate == 16000
        assert info.frames == pytest.approx(len(text) * 400 * speed * 16000 / 22050, abs=2)


def test_room_bench_is_the_wideband_bench_reverberant_and_noisy(tmp_path: Path) -> None:
    """Each wideband clip comes back as long, at 16 kHz, peak at most 0.9, the same from run to
    run: a burst leaves a decaying tail and a noise floor in the silence after it."""
    unseen = load_script("build_unseen_bench")
    t = np.arange(32000) / 16000
    burst = np.where(t < 1.0, 0.5 * np.sin(2 * np.pi * 220 * t), 0.0).astype(np.float32)
    wideband = tmp_path / "wideband"
    for name in ("a", "b"):
        write_audio(wideband / f"{name}.wav", burst, 16000)
    for out in ("room", "again"):
        unseen.build_room(wideband, tmp_path / out)
    for name in ("a", "b"):
        y, rate = sf.read(str(tmp_path / "room" / f"{name}.wav"), dtype="float32")
        assert rate == 16000 and len(y) == len(burst) and np.abs(y).max() <= 0.9 + 1e-4
        np.testing.assert_array_equal(y, sf.read(str(tmp_path / "again" / f"{name}.wav"))[0])
        spans = ((0, 16000), (16000, 16800), (-8000, None))  # the burst, 50 ms after, the end
        power = [float(np.mean(y[a:b] ** 2)) for a, b in spans]
        floor = power[0] / 10 ** (unseen.ROOM_SNR_DB[1] / 10)
        assert power[0] > power[1] > 3 * power[2] > floor  # speech, its tail, then the noise
