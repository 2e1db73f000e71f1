"""ViSQOL and DNSMOS through vqkit: the same numbers as the libraries called directly, the order
expected on known signals, 8 kHz outputs scored after resampling, failures and absence recorded."""

from __future__ import annotations

import importlib.resources

import numpy as np
import pytest

from vqkit.audio.io import fix_length, read_audio, resample
from vqkit.eval import bench, perceptual
from vqkit.eval.baselines import Output

RATE = 16000
installed = pytest.mark.skipif(perceptual.missing() is not None, reason=f"{perceptual.missing()}")


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    """2.3 s of a bundled real-speech clip at 16 kHz (DNSMOS then scores one 9 s window)."""
    sample = importlib.resources.files("vqkit") / "assets" / "sample"
    wave = read_audio(str(sample / "fr_CA_f_June_vm-sorry.flac"), RATE)[0]
    return wave[: int(2.3 * RATE)]


def low_passed(x: np.ndarray, cutoff: int) -> np.ndarray:
    """``x`` band-limited to ``cutoff`` Hz (soxr down and up again), same length."""
    return fix_length(resample(resample(x, RATE, 2 * cutoff), 2 * cutoff, RATE), x.shape[0])


@installed
def test_scores_equal_the_libraries_called_directly(speech):
    from speechmos import dnsmos
    from visqol.api import VisqolApi

    degraded = low_passed(speech, 2000)
    ours = perceptual.perceptual_scores(speech, degraded, RATE)
    api = VisqolApi()
    api.create(mode="speech", use_lattice_model=True)
    direct = api.measure_from_arrays(speech.astype(np.float64), degraded.astype(np.float64), RATE)
    assert ours["visqol"] == pytest.approx(direct.moslqo, rel=1e-9)
    theirs = dnsmos.run(degraded, RATE)
    for key, name in perceptual.DNSMOS_KEYS.items():
        assert ours[key] == pytest.approx(float(theirs[name]), rel=1e-4), key


@installed
def test_identical_scores_at_the_top_and_low_passed_lower(speech):
    same = perceptual.visqol(speech, speech, RATE)
    narrow = perceptual.visqol(speech, low_passed(speech, 2000), RATE)
    assert same > 4.4 and narrow < same - 0.5
    assert (
        perceptual.dnsmos_scores(low_passed(speech, 2000), RATE)["dnsmos_p808"]
        < (perceptual.dnsmos_scores(speech, RATE)["dnsmos_p808"])
    )


@installed
def test_an_8khz_output_is_scored_after_resampling(speech):
    narrow = resample(low_passed(speech, 3500), RATE, 8000)
    output = Output(narrow, 8000, None, None, 0.0, 0.0)
    row = bench.score(speech, RATE, output, narrowband=True, dnsmos=False)
    expected = perceptual.visqol(
        speech, fix_length(resample(narrow, 8000, RATE), speech.size), RATE
    )
    assert row["visqol"] == pytest.approx(expected, rel=1e-9)
    assert row["dnsmos_ovrl"] is None  # not asked for


@installed
def test_a_metric_that_fails_records_its_reason(speech):
    scores = perceptual.perceptual_scores(np.zeros_like(speech), speech, RATE)
    assert scores["visqol"] == {"error": "reference is silent"}
    assert isinstance(scores["dnsmos_ovrl"], float)  # DNSMOS needs no reference
    scores = perceptual.perceptual_scores(speech, np.zeros_like(speech), RATE)
    assert scores["visqol"] == {"error": "output is silent"}
    assert scores["dnsmos_ovrl"] == {"error": "signal is silent"}
    short = perceptual.perceptual_scores(speech[:800], speech[:800], RATE, dnsmos=False)
    assert "Too few samples" in short["visqol"]["error"]


def test_without_the_packages_the_columns_say_not_installed(monkeypatch, speech):
    monkeypatch.setattr(perceptual, "missing", lambda: "not installed: speechmos (pip ...)")
    output = Output(speech, RATE, 100, 90, 0.1, 0.1)
    rows = [
        {"system": "s", "family": "f", **bench.score(speech, RATE, output, False, dnsmos=True)}
        for _ in range(2)
    ]
    assert rows[0]["visqol"] == {"error": "not installed: speechmos (pip ...)"}
    assert isinstance(rows[0]["pesq_wb"], float)
    (summary,) = bench.summarise_rows(rows)
    assert summary["visqol"] is None and summary["visqol_failed"] == 2
    table = bench.format_table([summary])
    assert "not installed" in table.splitlines()[1]
