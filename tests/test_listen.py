"""``vqkit listen``: the blind MUSHRA page built from a bench (its audio, its conditions), the
page in headless Chromium with a scripted listener, and the aggregation of listeners' results
with BS.1534 post-screening."""

from __future__ import annotations

import base64
import contextlib
import csv
import html
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from browser import CHROMIUM, needs_chromium, run_chromium, screenshot
from conftest import TINY_BARE_CODEC, save_random_codec
from test_metrics import speechlike

from vqkit.cli import main
from vqkit.config import load_config
from vqkit.eval import bench, listen, mushra

RATE = 16000
SYSTEMS = ["vqkit-0.25k", "vqkit-0.50k", "oracle-griffinlim"]
CONDITIONS = ["hidden-reference", "anchor-3.5k", "anchor-7k", *SYSTEMS]
BUDGET = 120_000  # ms of virtual time for a scripted listener: ample, so that under load it
# never meets the end of the budget before it has rated and saved


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bench of a tiny random-weight codec and its oracle on two clips (DNSMOS off)."""
    root = tmp_path_factory.mktemp("listen")
    config = load_config(None, ["features.n_fft=256", "features.hop_length=64", *TINY_BARE_CODEC])
    model = save_random_codec(root / "tiny.safetensors", config, 129)
    (root / "clips").mkdir()
    sf.write(root / "clips" / "one.wav", speechlike(21, 1.0), RATE)
    sf.write(root / "clips" / "two.wav", speechlike(22, 1.2), RATE)
    bench.run_bench(
        root / "clips", root / "out", model=model, baselines=["oracle"], progress=False, dnsmos=[]
    )
    return root / "out"


@pytest.fixture(scope="module")
def test_page(bench_out: Path) -> tuple[Path, dict]:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(["listen", str(bench_out)]) == 0
    assert "2 trials, 6 conditions each" in buffer.getvalue()
    return bench_out / "listen" / "index.html", json.loads(
        (bench_out / "listen/test.json").read_text()
    )


def decoded(bench_out: Path, trial: str) -> dict[str, np.ndarray]:
    script = (bench_out / "listen" / "audio" / f"{trial}.js").read_text()
    payload = json.loads(script.split(" = ", 1)[1].rstrip().rstrip(";"))
    waves = {}
    for name, text in payload.items():
        wave, rate = sf.read(io.BytesIO(base64.b64decode(text)), dtype="float32")
        assert rate == RATE
        waves[name] = wave
    return waves


def band_energy(x: np.ndarray, low: float) -> float:
    spectrum = np.abs(np.fft.rfft(x)) ** 2
    return float(spectrum[np.fft.rfftfreq(x.size, 1 / RATE) > low].sum() / spectrum.sum())


def test_every_trial_holds_the_reference_anchors_and_systems(test_page, bench_out):
    page, config = test_page
    assert [t["name"] for t in config["trials"]] == ["one", "two"]
    for trial in config["trials"]:
        assert trial["conditions"] == CONDITIONS
        waves = decoded(bench_out, trial["name"])
        assert set(waves) == {"reference", *CONDITIONS[1:]}  # the hidden one plays the reference
        assert len({w.size for w in waves.values()}) == 1  # one length: seamless switching
        above_3k6, above_7k1 = (band_energy(waves["reference"], f) for f in (3600, 7100))
        assert band_energy(waves["anchor-3.5k"], 3600) < 0.01 * above_3k6
        assert band_energy(waves["anchor-7k"], 7100) < 0.01 * above_7k1
        assert band_energy(waves["anchor-7k"], 3600) > 0.5 * above_3k6
    text = page.read_text()
    assert not re.search(r'(?:src|href)="(?:https?:)?//', text)  # nothing from elsewhere
    assert '<a href="listen/index.html">' in (bench_out / "report.html").read_text()


def test_systems_can_be_chosen_and_errors_are_one_line(bench_out, tmp_path, capsys):
    _, config = listen.write_test(bench_out, ["vqkit-0.50k"])
    assert config["trials"][0]["conditions"] == [*CONDITIONS[:3], "vqkit-0.50k"]
    assert main(["listen", str(bench_out), "--systems", "opus-8k"]) == 1
    assert "unknown system(s) opus-8k; the bench has: vqkit-0.25k" in capsys.readouterr().err
    assert main(["listen", str(tmp_path)]) == 1
    assert "results.json not found: run `vqkit bench" in capsys.readouterr().err
    listen.write_test(bench_out)  # back to every system, for the tests after this one


def listener(page: Path, profile: Path, script: str) -> tuple[str, list[str]]:
    """A scripted listener (``#autotest=LISTENER&...``) on ``page``; its DOM and console. Its
    presses of Play count as gestures, and it gets a generous virtual-time budget."""
    url = f"{page.resolve().as_uri()}#autotest={script}"
    flags = ("--dump-dom", "--autoplay-policy=no-user-gesture-required")
    return run_chromium(url, profile, *flags, budget_ms=BUDGET)


def last_download(dom: str) -> dict:
    match = re.search(r'<pre id="last-download">(.*?)</pre>', dom, re.S)
    assert match and match.group(1), "the page saved no results"
    return json.loads(html.unescape(match.group(1)))


@needs_chromium
def test_a_scripted_listener_rates_every_trial_and_downloads(test_page, tmp_path):
    page, config = test_page
    dom, console = listener(page, tmp_path / "profile", "alice&score.anchor-3.5k=7")
    assert console == []  # loaded, decoded every condition's audio, no script error
    assert 'data-autotest="done"' in dom
    results = last_download(dom)
    assert results["test"] == config["test"] and results["listener"] == "alice"
    rated = {(r["trial"], r["condition"]) for r in results["ratings"]}
    assert rated == {(t, c) for t in ("one", "two") for c in CONDITIONS}
    assert all(
        set(r) == {"listener", "trial", "condition", "score", "time"} for r in results["ratings"]
    )
    assert {r["score"] for r in results["ratings"] if r["condition"] == "anchor-3.5k"} == {7}
    assert re.search(r'<progress id="progress" value="2" max="2">', dom)


@needs_chromium
def test_a_reload_loses_no_rating(test_page, tmp_path):
    page, _ = test_page
    # rates one trial, then rebuilds the page from its local storage alone, as a reload does
    dom, console = listener(page, tmp_path / "profile", "bob&trials=1&reload=1")
    assert console == []
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert 'data-autotest="reloaded"' in body and 'data-listener="bob"' in body, body
    assert re.search(r'<progress id="progress" value="1" max="2">', dom)
    assert "unrated" not in dom.split('id="conditions"')[1].split("</div>")[0]


def ratings_file(path: Path, test: str, listener: str, scores: dict[str, list[float]]) -> Path:
    rows = [
        {
            "listener": listener,
            "trial": trial,
            "condition": condition,
            "score": score,
            "time": "2026-11-29T21:00:00Z",
        }
        for condition, per_trial in scores.items()
        for trial, score in zip(("one", "two"), per_trial, strict=True)
    ]
    data = {"format": "vqkit-listening", "version": 1, "test": test, "listener": listener}
    path.write_text(json.dumps({**data, "ratings": rows}))
    return path


def test_two_listeners_one_screened_out_give_the_expected_table(test_page, bench_out, tmp_path):
    _, config = test_page
    good = {"hidden-reference": [100, 95], "anchor-3.5k": [10, 30], "vqkit-0.50k": [40, 60]}
    bad = {"hidden-reference": [100, 50], "anchor-3.5k": [90, 90], "vqkit-0.50k": [90, 90]}
    files = [
        ratings_file(tmp_path / "good.json", config["test"], "good", good),
        ratings_file(tmp_path / "bad.json", config["test"], "bad", bad),
    ]
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(["listen", str(bench_out), "--ratings", *map(str, files)]) == 0
    printed = buffer.getvalue()
    # bad rated the hidden reference below 90 in 1 of 2 trials: 50 % > 15 %.
    assert "dropped bad: rated the hidden reference below 90 in 1 of 2 trials" in printed
    with open(bench_out / "listen" / "listening.csv", newline="") as f:
        table = {row["condition"]: row for row in csv.DictReader(f)}
    assert list(table) == ["hidden-reference", "anchor-3.5k", "vqkit-0.50k"]
    t_975_1 = 12.706204736174698  # Student's t, 97.5 %, one degree of freedom
    expected = {"hidden-reference": (97.5, 2.5), "anchor-3.5k": (20, 10), "vqkit-0.50k": (50, 10)}
    for condition, (mean, half_spread) in expected.items():
        row = table[condition]
        assert float(row["mean"]) == pytest.approx(mean)
        assert float(row["ci95"]) == pytest.approx(t_975_1 * half_spread)
        assert row["n"] == "2" and row["listeners"] == "1"
    assert float(table["vqkit-0.50k"]["kbps"]) == pytest.approx(0.5, rel=0.1)
    assert table["anchor-3.5k"]["kbps"] == ""
    assert (bench_out / "listen" / "listening.png").read_bytes()[:4] == b"\x89PNG"
    assert '<img src="listen/listening.png"' in (bench_out / "report.html").read_text()
    if CHROMIUM:  # the report with its listening section loads, every image and link found
        assert screenshot(bench_out / "report.html", tmp_path / "r.png", tmp_path / "p") == []


def test_ratings_from_another_test_or_malformed_are_refused(test_page, tmp_path):
    _, config = test_page
    other = ratings_file(tmp_path / "other.json", "0123456789ab", "x", {"anchor-7k": [1, 2]})
    with pytest.raises(Exception, match="from another listening test"):
        mushra.read_ratings([other], test=config["test"])
    (tmp_path / "bad.json").write_text('{"format": "vqkit-listening", "ratings": [{}]}')
    with pytest.raises(Exception, match="a malformed rating"):
        mushra.read_ratings([tmp_path / "bad.json"])
    kept, dropped = mushra.screen(mushra.read_ratings([other]))
    assert kept == [] and dropped == {"x": "never rated the hidden reference"}
