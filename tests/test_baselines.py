"""Baseline adapters: Codec 2 and Opus through their tools, the Griffin-Lim oracle, delay finding,
Ogg payload counting, and missing tools reported as skipped."""

from __future__ import annotations

import shutil
import struct
from types import SimpleNamespace

import numpy as np
import pytest
from test_metrics import speechlike

from vqkit.audio.frontends import make_frontend
from vqkit.audio.io import resample
from vqkit.config import load_config
from vqkit.errors import VqkitError
from vqkit.eval import baselines
from vqkit.eval.metrics import pesq_wb, stoi

RATE = 16000
needs_codec2 = pytest.mark.skipif(
    shutil.which("c2enc") is None or shutil.which("c2dec") is None,
    reason="Codec 2 tools (c2enc, c2dec) are not installed: apt-get install codec2",
)
needs_opus = pytest.mark.skipif(
    shutil.which("opusenc") is None or shutil.which("opusdec") is None,
    reason="Opus tools (opusenc, opusdec) are not installed: apt-get install opus-tools",
)


def speech(seed: int, seconds: float = 1.2) -> np.ndarray:
    return speechlike(seed, seconds, RATE)


def test_shift_undoes_a_delay_and_keeps_the_length():
    y = np.arange(10, dtype=np.float32)
    assert baselines.shift(y, 3, 10).tolist() == [3, 4, 5, 6, 7, 8, 9, 0, 0, 0]
    assert baselines.shift(y, -2, 5).tolist() == [0, 0, 0, 1, 2]


@pytest.mark.parametrize("lag", [0, 37, 211])
def test_find_delay_recovers_a_known_shift(lag):
    refs = [speech(seed) for seed in (1, 2)]
    rng = np.random.default_rng(0)
    delayed = [
        np.concatenate([np.zeros(lag, np.float32), x])[: x.size]
        + 0.01 * rng.standard_normal(x.size)
        for x in refs
    ]
    assert baselines.estimate_lag(refs, delayed, max_lag=400) == lag
    assert baselines.find_delay(refs, delayed, RATE, max_lag=400) == lag


def ogg_page(segments: list[int], payload_fill: int = 0) -> bytes:
    header = b"OggS" + bytes(22) + struct.pack("B", len(segments))
    return header + bytes(segments) + bytes([payload_fill]) * sum(segments)


def test_ogg_packet_sizes_follow_lacing_across_pages():
    # Packet of 300 bytes laced as 255 + 45, then one of 10; then a packet spanning two pages.
    data = ogg_page([255, 45, 10]) + ogg_page([255]) + ogg_page([255, 7])
    assert baselines.ogg_packet_sizes(data) == [300, 10, 517]
    with pytest.raises(ValueError, match="not an Ogg page"):
        baselines.ogg_packet_sizes(b"RIFF" + bytes(40))


@needs_codec2
def test_codec2_runs_every_detected_mode_at_its_bitrate():
    modes = baselines.codec2_modes()
    assert "3200" in modes and "1200" in modes
    x = speech(3, seconds=1.0)
    out = baselines.Codec2("1200").run(x, RATE)
    assert out.sample_rate == 8000 and out.wave.shape == (x.size // 2,)
    kbps = out.n_bytes * 8 / (x.size / RATE) / 1000
    assert 1.1 < kbps < 1.35 and out.payload_bytes == out.n_bytes
    assert out.encode_seconds > 0 and out.decode_seconds > 0


@needs_codec2
def test_codec2_delay_alignment_raises_stoi():
    refs = [resample(speech(seed, seconds=1.6), RATE, 8000) for seed in (4, 5)]
    outs = [baselines.Codec2("3200").run(x, 8000).wave for x in refs]
    lag = baselines.find_delay(refs, outs, 8000, baselines.CODEC2_MAX_LAG)
    assert 80 <= lag <= 400  # Codec 2's decoder delay is some 10-50 ms
    before = np.mean([stoi(x, y, 8000) for x, y in zip(refs, outs, strict=True)])
    after = np.mean(
        [stoi(x, baselines.shift(y, lag, x.size), 8000) for x, y in zip(refs, outs, strict=True)]
    )
    assert after > before + 0.05


@needs_opus
def test_opus_bitrate_is_measured_from_packets():
    x = speech(6, seconds=2.0)
    out = baselines.Opus(6.0).run(x, RATE)
    assert out.sample_rate == RATE and out.wave.shape == x.shape
    kbps = out.payload_bytes * 8 / (x.size / RATE) / 1000
    assert 5.0 < kbps < 6.5
    assert out.n_bytes > out.payload_bytes  # the Ogg pages and headers are not payload
    assert pesq_wb(x, out.wave, RATE) > 1.5


def test_oracle_is_near_transparent_on_true_magnitudes():
    config = load_config(None, ["codec.gl_iters=32"])
    codec = SimpleNamespace(
        sample_rate=RATE,
        frontend=make_frontend(config.features, RATE),
        checkpoint=SimpleNamespace(config=config),
        parametric=False,
    )
    x = speech(7, seconds=1.2)
    out = baselines.Oracle(codec).run(x, RATE)
    assert out.wave.shape == x.shape and out.n_bytes is None
    assert stoi(x, out.wave, RATE) > 0.9


def test_missing_tools_are_skipped_with_a_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    systems, skipped = baselines.make_baselines(["codec2", "opus", "oracle"], codec=None)
    assert systems == []
    reasons = {s["system"]: s["reason"] for s in skipped}
    assert reasons["codec2"] == "c2enc, c2dec not found on PATH"
    assert reasons["opus"] == "opusenc, opusdec not found on PATH"
    assert "no model" in reasons["oracle"]


def test_unknown_baseline_suggests_the_near_name():
    with pytest.raises(VqkitError, match="unknown baseline 'codec'; did you mean 'codec2'"):
        baselines.make_baselines(["codec"], codec=None)
