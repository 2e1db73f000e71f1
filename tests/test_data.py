"""Corpus layouts, splits, ``prepare`` (resume, failures, config checks), the cache and datasets."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from vqkit.audio.frontends import row_frequencies
from vqkit.audio.stft import DB_FLOOR
from vqkit.cli import main
from vqkit.config import Config, load_config
from vqkit.data.augment import (
    EQ_DB,
    LEVEL_DB,
    LOWPASS_DB_PER_ROW,
    NOISE_SNR_DB,
    NOISE_TILT_DB,
    REVERB_DRR_DB,
    REVERB_T60,
    TILT_DB,
    WARP_LOG,
    add_noise,
    add_reverb,
    channel_gain,
    through_channel,
    warp_rows,
)
from vqkit.data.cache import FeatureCache
from vqkit.data.corpora import list_corpus
from vqkit.data.dataset import SegmentDataset, make_normaliser
from vqkit.data.prepare import prepare
from vqkit.errors import VqkitError

SMALL = ["audio.sample_rate=8000", "features.n_fft=256", "features.hop_length=64"]
SET_SMALL = [arg for s in SMALL for arg in ("--set", s)]
N_BINS = 129


def small_config(*overrides: str) -> Config:
    return load_config(None, [*SMALL, *overrides])


def write_wave(path: Path, seconds: float = 0.1, sample_rate: int = 8000, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    wave = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 1000) * t) + 0.01 * rng.standard_normal(len(t))
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, wave.astype(np.float32), sample_rate)
    return path


def fsdd_tree(root: Path, speakers=("ann", "bob", "cy"), digits=(0, 1), n_index=10) -> Path:
    for s, speaker in enumerate(speakers):
        for digit in digits:
            for index in range(n_index):
                seconds = 0.05 + 0.01 * index
                write_wave(root / f"{digit}_{speaker}_{index}.wav", seconds, seed=s * 100 + index)
    return root


def rows_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def run(src: Path, out: Path, *overrides: str, workers: int = 1):
    return prepare(src, out, small_config(*overrides), workers=workers, progress=False)


# --- layouts ---------------------------------------------------------------------------------


def test_fsdd_official_split_and_cache(tmp_path: Path) -> None:
    src = fsdd_tree(tmp_path / "recordings")
    summary = run(src, tmp_path / "out", "data.layout='auto'", "data.val_fraction=0.2")
    rows = rows_of(tmp_path / "out")
    assert summary.n_ok == len(rows) == 60 and summary.layout == "fsdd" and summary.n_failed == 0
    index = {r["path"]: int(r["path"].split("_")[2].split(".")[0]) for r in rows}
    assert {r["path"] for r in rows if r["split"] == "test"} == {
        p for p, i in index.items() if i < 5
    }
    val = [r for r in rows if r["split"] == "val"]
    assert val and all(index[r["path"]] >= 5 for r in val)
    assert all(r["label"] == r["path"][0] and r["speaker"] in ("ann", "bob", "cy") for r in rows)
    cache = FeatureCache(tmp_path / "out")
    item = cache.items("train")[0]
    x = cache.load(item)
    assert x.dtype == np.float32 and x.shape == (N_BINS, item["frames"])
    assert item["frames"] == 1 + round(item["duration"] * 8000) // 64
    assert item["x_min"] == x.min() and item["x_max"] == x.max()
    assert cache.config == small_config("data.layout='auto'", "data.val_fraction=0.2")
    run(src, tmp_path / "again", "data.val_fraction=0.2")
    assert rows_of(tmp_path / "again") == rows  # the same split (and features) on another run
    _, parent = list_corpus(tmp_path, small_config("data.layout='fsdd'").data)  # its parent
    assert {u.path for u in parent if u.split == "test"} == {
        f"recordings/{r['path']}" for r in rows if r["split"] == "test"
    }


def test_folder_layout_any_format(tmp_path: Path) -> None:
    src = tmp_path / "corpus"
    write_wave(src / "alice" / "a.wav")
    (src / "alice" / "deep").mkdir()
    sf.write(src / "alice" / "deep" / "b.flac", np.full(800, 0.1, np.float32), 8000)
    (src / "bob").mkdir()
    sf.write(src / "bob" / "c.ogg", 0.1 * np.sin(np.arange(1600, dtype=np.float32) / 5), 16000)
    write_wave(src / "top.wav")
    (src / "notes.txt").write_text("not audio")
    write_wave(src / ".hidden" / "x.wav")
    layout, found = list_corpus(src, small_config().data)
    assert layout == "folder"
    assert {u.path: u.speaker for u in found} == {
        "alice/a.wav": "alice",
        "alice/deep/b.flac": "alice",
        "bob/c.ogg": "bob",
        "top.wav": None,
    }
    summary = run(src, tmp_path / "out")
    assert summary.n_ok == 4 and summary.n_failed == 0
    ogg = next(r for r in rows_of(tmp_path / "out") if r["path"] == "bob/c.ogg")
    assert ogg["duration"] == pytest.approx(0.1) and ogg["frames"] == 1 + 800 // 64  # resampled


def test_l2arctic_subset(tmp_path: Path) -> None:
    for s, speaker in enumerate(("ABA", "BWC", "HKK")):
        for i in range(4):
            write_wave(tmp_path / "l2" / speaker / "wav" / f"arctic_a{i:04d}.wav", seed=s * 10 + i)
        (tmp_path / "l2" / speaker / "transcript").mkdir()
    data = small_config("data.speakers=['ABA', 'HKK']", "data.max_per_speaker=3").data
    layout, found = list_corpus(tmp_path / "l2", data)
    assert layout == "l2arctic"
    assert Counter(u.speaker for u in found) == {"ABA": 3, "HKK": 3}
    assert all(u.path.startswith(f"{u.speaker}/wav/") for u in found)
    again = list_corpus(tmp_path / "l2", data)[1]
    assert [u.path for u in again] == [u.path for u in found]  # the subset is deterministic
    with pytest.raises(VqkitError, match="speaker 'XYZ' not found"):
        list_corpus(tmp_path / "l2", small_config("data.speakers=['XYZ']").data)


def test_speechcommands_lists_and_labels(tmp_path: Path) -> None:
    src = tmp_path / "sc"
    names = []
    for label in ("yes", "no", "up"):
        for i, speaker in enumerate(("0a1b2c3d", "9f8e7d6c", "12345678")):
            write_wave(src / label / f"{speaker}_nohash_{i}.wav", seed=len(names))
            names.append(f"{label}/{speaker}_nohash_{i}.wav")
    write_wave(src / "_background_noise_" / "white_noise.wav", seconds=0.3)
    (src / "validation_list.txt").write_text("\n".join(n for n in names if "9f8e7d6c" in n) + "\n")
    (src / "testing_list.txt").write_text("\n".join(n for n in names if "12345678" in n) + "\n")
    layout, found = list_corpus(src, small_config("data.speaker_disjoint=true").data)
    assert layout == "speechcommands" and len(found) == 9
    for u in found:
        expected = {"0a1b2c3d": "train", "9f8e7d6c": "val", "12345678": "test"}[u.speaker]
        assert u.split == expected and u.label == u.path.split("/")[0]
    _, subset = list_corpus(src, small_config("data.labels=['yes', 'up']").data)
    assert {u.label for u in subset} == {"yes", "up"} and len(subset) == 6
    with pytest.raises(VqkitError, match="label '_background_noise_' not found"):
        list_corpus(src, small_config("data.labels=['_background_noise_']").data)


def test_ljspeech_metadata(tmp_path: Path) -> None:
    src = tmp_path / "LJSpeech-1.1"
    lines = []
    for i in range(12):
        write_wave(src / "wavs" / f"LJ001-{i:04d}.wav", seed=i)
        lines.append(f"LJ001-{i:04d}|Text {i}.|Text number {i}.")
    (src / "metadata.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    summary = run(src, tmp_path / "out")
    rows = rows_of(tmp_path / "out")
    assert summary.layout == "ljspeech" and len(rows) == 12
    assert all(r["speaker"] == "LJ" and r["text"].startswith("Text number") for r in rows)
    assert set(summary.splits) <= {"train", "val", "test"} and summary.splits["train"] >= 6
    with pytest.raises(VqkitError, match="at least 3 speakers, found 1"):
        list_corpus(src, small_config("data.speaker_disjoint=true").data)


def test_hash_split_is_deterministic_and_speaker_disjoint_option(tmp_path: Path) -> None:
    for s in range(6):
        for i in range(30):
            (tmp_path / f"spk{s}").mkdir(exist_ok=True)
            (tmp_path / f"spk{s}" / f"{i}.wav").touch()  # listing does not decode
    data = small_config("data.val_fraction=0.2", "data.test_fraction=0.2").data
    first = list_corpus(tmp_path, data)[1]
    assert first == list_corpus(tmp_path, data)[1]
    counts = Counter(u.split for u in first)
    assert 20 <= counts["test"] <= 55 and 20 <= counts["val"] <= 55
    other = list_corpus(tmp_path, small_config("data.seed=1").data)[1]
    assert [u.split for u in other] != [u.split for u in first]
    disjoint = list_corpus(tmp_path, small_config("data.speaker_disjoint=true").data)[1]
    by_speaker = {}
    for u in disjoint:
        by_speaker.setdefault(u.speaker, set()).add(u.split)
    assert all(len(s) == 1 for s in by_speaker.values())
    assert Counter(s.pop() for s in by_speaker.values()) == {"train": 4, "val": 1, "test": 1}


def test_fsdd_speaker_disjoint_overrides_the_index_split(tmp_path: Path) -> None:
    src = fsdd_tree(tmp_path, speakers=("a", "b", "c", "d"), digits=(3,), n_index=6)
    found = list_corpus(src, small_config("data.speaker_disjoint=true").data)[1]
    splits = {u.speaker: {v.split for v in found if v.speaker == u.speaker} for u in found}
    assert all(len(s) == 1 for s in splits.values())
    assert {s for v in splits.values() for s in v} == {"train", "val", "test"}


# --- prepare: failures, resume, workers, config ----------------------------------------------


def test_undecodable_files_are_reported_and_skipped(tmp_path: Path, capsys) -> None:
    src = fsdd_tree(tmp_path / "src", speakers=("ann",), digits=(1,), n_index=6)
    (src / "2_ann_0.wav").write_bytes(b"RIFF\x00\x00garbage that is not a wave file")
    sf.write(src / "2_ann_1.wav", np.zeros(0, np.float32), 8000)  # no samples
    sf.write(src / "2_ann_2.wav", np.full(100, np.nan, np.float32), 8000, subtype="FLOAT")
    summary = run(src, tmp_path / "out")
    assert (summary.n_ok, summary.n_failed) == (6, 3)
    assert [p for p, _ in summary.failed] == ["2_ann_0.wav", "2_ann_1.wav", "2_ann_2.wav"]
    reasons = " ".join(r for _, r in summary.failed)
    assert "cannot decode" in reasons and "no samples" in reasons and "NaN" in reasons
    assert "2_ann_0.wav" in summary.describe() and "3 failed" in summary.describe()
    assert FeatureCache(tmp_path / "out").info["n_failed"] == 3
    assert len(rows_of(tmp_path / "out")) == 6
    assert main(["prepare", str(src), str(tmp_path / "cli"), *SET_SMALL]) == 0
    assert "failed: 2_ann_1.wav: audio has no samples" in capsys.readouterr().out


def test_nothing_prepared_exits_nonzero(tmp_path: Path, capsys) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "bad.wav").write_bytes(b"not audio at all")
    assert main(["prepare", str(tmp_path / "src"), str(tmp_path / "out")]) == 1
    assert "bad.wav" in capsys.readouterr().out
    assert main(["prepare", str(tmp_path / "empty"), str(tmp_path / "out2")]) == 1
    assert "is not a folder" in capsys.readouterr().err


def without_location(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("features", "offset")}


def test_resume_after_a_torn_run(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("vqkit.data.prepare.SHARD_ITEMS", 4)
    src = fsdd_tree(tmp_path / "src", speakers=("ann", "bob"), digits=(4,), n_index=8)
    out = tmp_path / "out"
    run(src, out)
    complete = rows_of(out)
    cache = FeatureCache(out)
    features = {row["path"]: cache.load(row) for row in complete}
    assert len({row["features"] for row in complete}) == 4  # 16 utterances in shards of 4
    lines = (out / "manifest.jsonl").read_text().splitlines()
    # as a kill -9 leaves it: 3 rows lost, a torn line, a shard gone, a temporary file
    (out / "manifest.jsonl").write_text("\n".join(lines[:-3]) + "\n" + lines[-3][:25])
    (out / complete[0]["features"]).unlink()  # rows 0-3
    (out / "features" / ".shard-x.npy.abc.tmp").write_bytes(b"partial")
    (out / "stats.json").unlink()
    with pytest.raises(VqkitError, match="incomplete"):
        FeatureCache(out)
    summary = run(src, out)
    assert (summary.n_ok, summary.n_skipped) == (16, 9)
    rows = rows_of(out)
    assert [without_location(r) for r in rows] == [without_location(r) for r in complete]
    cache = FeatureCache(out)
    assert all(np.array_equal(cache.load(row), features[row["path"]]) for row in rows)
    assert not list((out / "features").glob(".*.tmp"))
    used = {row["features"] for row in rows}
    assert {f"features/{p.name}" for p in (out / "features").iterdir()} == used


def test_kill_9_then_rerun_completes(tmp_path: Path) -> None:
    src = fsdd_tree(tmp_path / "src", speakers=("ann", "bob", "cy", "dee"), digits=(5,), n_index=60)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "vqkit", "prepare", str(src), str(out), "--layout", "fsdd"]
    cmd += SET_SMALL
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = out / "manifest.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if manifest.exists() and manifest.read_text().count("\n") >= 10:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "prepare finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert manifest.read_text().count("\n") < 240
    summary = run(src, out, "data.layout='fsdd'")
    rows = rows_of(out)
    assert summary.n_ok == len(rows) == 240 and summary.n_skipped >= 10
    assert len({r["path"] for r in rows}) == 240
    cache = FeatureCache(out)
    assert all(cache.load(r).shape == (N_BINS, r["frames"]) for r in rows)


def test_workers_give_the_same_cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("vqkit.data.prepare.SHARD_ITEMS", 4)  # 6 shards for 2 workers
    src = fsdd_tree(tmp_path / "src", speakers=("ann", "bob"), digits=(6,), n_index=12)
    one, two = run(src, tmp_path / "one"), run(src, tmp_path / "two", workers=2)
    assert one.n_ok == two.n_ok == 24
    assert rows_of(tmp_path / "one") == rows_of(tmp_path / "two")
    a, b = FeatureCache(tmp_path / "one"), FeatureCache(tmp_path / "two")
    np.testing.assert_array_equal(a.stats["std"], b.stats["std"])
    assert all(np.array_equal(a.load(r), b.load(r)) for r in a.items("test"))


def test_duration_pads_and_crops(tmp_path: Path) -> None:
    src = fsdd_tree(tmp_path / "src", speakers=("ann",), digits=(7,), n_index=8)
    run(src, tmp_path / "out", "audio.duration=0.1")
    rows = rows_of(tmp_path / "out")
    assert {r["duration"] for r in rows} == {0.1} and {r["frames"] for r in rows} == {1 + 800 // 64}


def test_config_errors(tmp_path: Path, capsys) -> None:
    src = fsdd_tree(tmp_path / "src", speakers=("ann",), digits=(8,), n_index=6)
    run(src, tmp_path / "out")
    with pytest.raises(VqkitError, match=r"features.n_fft=256, now 512"):
        prepare(src, tmp_path / "out", small_config("features.n_fft=512"), progress=False)
    with pytest.raises(VqkitError, match="did you mean 'fsdd'"):
        run(src, tmp_path / "x", "data.layout='fdsd'")
    with pytest.raises(VqkitError, match="did you mean 'minmax'"):
        run(src, tmp_path / "x", "features.normalise='minmx'")
    with pytest.raises(VqkitError, match="win_length"):
        run(src, tmp_path / "x", "features.win_length=1024")
    with pytest.raises(VqkitError, match="the output would overwrite the input"):
        run(src, src)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(VqkitError, match="not empty and not a feature cache"):
        run(src, tmp_path / "notes")
    with pytest.raises(VqkitError, match="workers"):
        run(src, tmp_path / "x", workers=0)
    assert main(["prepare", str(src), str(tmp_path / "y"), "--set", "data.layot=fsdd"]) == 1
    assert "unknown config key 'data.layot'; did you mean 'layout'?" in capsys.readouterr().err


def test_a_cache_made_before_a_key_reads_as_it_was_made(tmp_path: Path) -> None:
    """A cache whose config.json predates ``features.pitch`` was analysed with YIN's first dip:
    it says so, and preparing into it with the tracker is refused naming both."""
    src = fsdd_tree(tmp_path / "src", speakers=("ann",), digits=(8,), n_index=6)
    run(src, tmp_path / "out")
    made = json.loads((tmp_path / "out" / "config.json").read_text())
    assert made["features"].pop("pitch") == "tracked"
    (tmp_path / "out" / "config.json").write_text(json.dumps(made))
    assert FeatureCache(tmp_path / "out").config.features.pitch == "yin"
    with pytest.raises(VqkitError, match="prepared with features.pitch='yin', now 'tracked'"):
        run(src, tmp_path / "out")


def test_a_second_writer_is_refused(tmp_path: Path) -> None:
    src = fsdd_tree(tmp_path / "src", speakers=("ann",), digits=(9,), n_index=6)
    out = tmp_path / "out"
    out.mkdir()
    hold = "import fcntl, sys, time; f = open(sys.argv[1], 'w'); fcntl.lockf(f, fcntl.LOCK_EX); "
    hold += "print('locked', flush=True); time.sleep(60)"
    proc = subprocess.Popen(
        [sys.executable, "-c", hold, str(out / ".lock")], stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout.readline().strip() == b"locked"
        with pytest.raises(VqkitError, match="another vqkit prepare"):
            run(src, out)
    finally:
        proc.kill()
        proc.wait()


# --- the cache and the dataset ---------------------------------------------------------------


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cache")
    src = fsdd_tree(root / "src", speakers=("ann", "bob"), digits=(0, 1), n_index=10)
    run(src, root / "out", "data.val_fraction=0.3")
    return root / "out"


def test_stats_are_over_the_train_split(cache_dir: Path) -> None:
    cache = FeatureCache(cache_dir)
    train = np.concatenate([cache.load(r) for r in cache.items("train")], axis=1)
    np.testing.assert_allclose(cache.stats["mean"], train.mean(axis=1), atol=1e-3)
    np.testing.assert_allclose(cache.stats["std"], np.maximum(train.std(axis=1), 1.0), atol=1e-3)
    assert set(cache.stats) == {"mean", "std"} and cache.stats["mean"].dtype == np.float32
    everything = np.concatenate([cache.load(r) for r in cache._rows], axis=1)
    assert not np.allclose(cache.stats["mean"], everything.mean(axis=1), atol=1e-3)


def test_segments_meanstd(cache_dir: Path) -> None:
    cache = FeatureCache(cache_dir)
    items = cache.items("train")
    long = max(range(len(items)), key=lambda i: items[i]["frames"])
    short = min(range(len(items)), key=lambda i: items[i]["frames"])
    seg = (items[long]["frames"] + items[short]["frames"]) // 2
    data = SegmentDataset(cache, "train", seg, train=True, seed=3)
    crops = [data[long] for _ in range(8)]
    assert all(c.shape == (N_BINS, seg) and c.dtype == torch.float32 for c in crops)
    assert any(not torch.equal(crops[0], c) for c in crops[1:])  # random crops
    again = SegmentDataset(cache, "train", seg, train=True, seed=3)
    assert all(torch.equal(c, again[long]) for c in crops)  # reproducible by seed
    norm = make_normaliser(cache)
    whole = norm.normalise(torch.from_numpy(cache.load(items[long]))[None])[0]
    start = SegmentDataset(cache, "train", seg, train=False)
    torch.testing.assert_close(start[long], whole[:, :seg])
    padded = start[short]
    n = items[short]["frames"]
    silence = (DB_FLOOR - torch.from_numpy(cache.stats["mean"])) / torch.from_numpy(
        cache.stats["std"]
    )
    torch.testing.assert_close(padded[:, n:], silence[:, None].expand(-1, seg - n))
    raw = torch.from_numpy(cache.load(items[short]))
    torch.testing.assert_close(
        norm.denormalise(padded[None, :, :n], None)[0], raw, atol=1e-3, rtol=0
    )


@pytest.mark.parametrize("kind,low", [("minmax", 0.0), ("minmax_sym", -1.0)])
def test_segments_minmax_use_the_items_own_range(
    cache_dir: Path, tmp_path: Path, kind, low
) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("manifest.jsonl", "stats.json", "features"):
        (copy / name).symlink_to(cache_dir / name)
    config = json.loads((cache_dir / "config.json").read_text())
    config["features"]["normalise"] = kind
    (copy / "config.json").write_text(json.dumps(config))
    cache = FeatureCache(copy)
    data = SegmentDataset(cache, "test", 0, train=False)
    for i, item in enumerate(cache.items("test")):
        y = data[i]
        assert y.shape == (N_BINS, item["frames"])
        assert y.min() == pytest.approx(low) and y.max() == pytest.approx(1.0)
    batch = data.collate([data[0], data[1], data[2]])
    longest = max(item["frames"] for item in cache.items("test")[:3])
    assert batch.shape == (3, N_BINS, longest)
    shortest = min(range(3), key=lambda i: cache.items("test")[i]["frames"])
    assert (batch[shortest, :, -1] == low).all()
    loader = torch.utils.data.DataLoader(data, batch_size=4, collate_fn=data.collate)
    assert next(iter(loader)).shape[:2] == (4, N_BINS)


def test_a_channel_shifts_each_row_alike_and_keeps_silence() -> None:
    x = torch.tensor([[-100.0, -20.0, -30.0], [-100.0, -100.0, -40.0]])
    gain = np.array([5.0, -70.0])
    y = through_channel(x, gain, floor_db=-100.0)
    torch.testing.assert_close(y, torch.tensor([[-100.0, -15.0, -25.0], [-100.0, -100.0, -100.0]]))
    rng = np.random.default_rng(0)
    gains = np.stack([channel_gain(40, rng) for _ in range(400)])
    assert np.abs(gains).max() > 6  # channels really differ ...
    assert np.all(gains <= LEVEL_DB + TILT_DB / 2 + EQ_DB + 1e-9)  # ... and never boost beyond this
    assert 0.1 < np.mean(gains[:, -1] < gains[:, -2] - LOWPASS_DB_PER_ROW / 2) < 0.4  # low-passed
    np.testing.assert_array_equal(
        channel_gain(40, np.random.default_rng(1)), channel_gain(40, np.random.default_rng(1))
    )


def test_a_room_adds_a_decaying_tail_below_the_direct_sound() -> None:
    """An impulse frame in a room: the frames after it gain the late reverberation, falling 60 dB
    per reverberation time, its energy 6-15 dB below the impulse's; the frames before it (a room
    is causal) and every row alike."""
    quiet = torch.full((3, 200), -120.0)
    impulse = quiet.clone()
    impulse[:, 50] = 0.0
    for seed in range(5):
        rng = np.random.default_rng(seed)
        t60, drr = rng.uniform(*REVERB_T60), rng.uniform(*REVERB_DRR_DB)
        y, y0 = (add_reverb(x, np.random.default_rng(seed), 0.01) for x in (impulse, quiet))
        torch.testing.assert_close(y[:, :50], y0[:, :50])
        assert float(y[0, 50]) == pytest.approx(0.0, abs=1e-3)
        tail = torch.pow(10.0, y[0, 51:].double() / 10) - torch.pow(10.0, y0[0, 51:].double() / 10)
        assert 10 * math.log10(float(tail.sum())) == pytest.approx(-drr, abs=0.1)
        fall = 10 * math.log10(float(tail[0] / tail[10]))  # dB over 100 ms
        assert fall == pytest.approx(60 * 0.1 / t60, rel=0.01)
        torch.testing.assert_close(y[1], y[0])


def test_noise_fills_the_quiet_rows_at_its_ratio() -> None:
    """Stationary noise sets a floor NOISE_SNR_DB below the segment's mean power, tilted at most
    NOISE_TILT_DB across the rows: quiet frames rise to it, loud ones keep their level."""
    x = torch.full((40, 100), -100.0)
    x[:, ::2] = -10.0  # loud frames, mean power about -13 dB
    for seed in range(10):
        y = add_noise(x, np.random.default_rng(seed), floor_db=-100.0)
        floor = y[:, 1::2].mean(1)  # the noise alone, per row
        level = 10 * math.log10(float(torch.pow(10.0, x.double() / 10).mean()))
        assert (floor <= level - NOISE_SNR_DB[0] + NOISE_TILT_DB / 2 + 0.1).all()
        assert (floor >= level - NOISE_SNR_DB[1] - NOISE_TILT_DB / 2 - 0.1).all()
        assert (y[:, ::2] - x[:, ::2]).abs().max() < 0.2


def test_warp_scales_every_frequency_by_one_factor() -> None:
    """A feature equal to its row's frequency comes back as frequency / factor on the rows whose
    source lies inside the axis: one factor within +-WARP_LOG for all rows and frames, the ends
    held beyond; draws differ."""
    freqs = np.geomspace(60.0, 7800.0, 40)
    x = torch.from_numpy(freqs).float()[:, None].repeat(1, 5)
    factors = []
    for seed in range(4):
        y = warp_rows(x, freqs, np.random.default_rng(seed))
        inside = (freqs / 0.8 < freqs[-1]) & (freqs * 0.8 > freqs[0])
        ratio = (x / y)[torch.from_numpy(inside)]
        assert abs(math.log(ratio.mean())) <= WARP_LOG + 1e-6
        torch.testing.assert_close(ratio, ratio.mean().expand_as(ratio), rtol=0.02, atol=0)
        assert y.min() >= freqs[0] - 1e-3 and y.max() <= freqs[-1] + 1e-3
        factors.append(float(ratio.mean()))
    assert len(set(round(f, 4) for f in factors)) == 4


def test_rooms_and_noise_in_training_segments(cache_dir: Path) -> None:
    """The room, noise and warp shares act on training segments only, reproducibly by seed; at 0
    they draw nothing, so a channel-only recipe crops and colours as before."""
    cache = FeatureCache(cache_dir)
    plain = SegmentDataset(cache, "train", 8, train=True, seed=3, augment=1.0)
    zero = SegmentDataset(cache, "train", 8, train=True, seed=3, augment=1.0, reverb=0.0, noise=0.0)
    torch.testing.assert_close(zero[0], plain[0])
    config = cache.config
    freqs = row_frequencies(config.features, config.audio.sample_rate)
    assert len(freqs) == config.features.n_fft // 2 + 1
    for kind in ("reverb", "noise", "warp"):
        both = [SegmentDataset(cache, "train", 8, train=True, seed=3, **{kind: 1.0}) for _ in "ab"]
        torch.testing.assert_close(both[0][0], both[1][0])
        assert not torch.allclose(both[0][0], SegmentDataset(cache, "train", 8, seed=3)[0])
        val = SegmentDataset(cache, "val", 8, train=False, **{kind: 1.0})
        torch.testing.assert_close(val[0], SegmentDataset(cache, "val", 8, train=False)[0])
    for key in ("augment_noise", "augment_warp"):
        with pytest.raises(VqkitError, match=f"train.{key} needs spectral features"):
            load_config(None, [f"train.{key}=0.5", "features.normalise='minmax'"])


def test_augmented_training_segments(cache_dir: Path) -> None:
    """Training segments pass through a random channel per segment, reproducibly by seed;
    validation segments never do."""
    cache = FeatureCache(cache_dir)
    norm = make_normaliser(cache)
    plain = SegmentDataset(cache, "train", 8, train=True, seed=3)
    augmented = SegmentDataset(cache, "train", 8, train=True, seed=3, augment=1.0)
    first = augmented[0]
    x, y = (norm.denormalise(z[None], None)[0] for z in (plain[0], first))
    above = (x > DB_FLOOR + 1) & (y > DB_FLOOR + 1)
    shift = torch.where(above, y - x, torch.nan)
    spread = (shift.nan_to_num(0).amax(1) - shift.nan_to_num(0).amin(1))[above.all(1)]
    assert spread.numel() > 0 and spread.max() < 1e-3  # one gain per row, the same every frame
    assert shift.nan_to_num(0).abs().max() > 0.5
    again = SegmentDataset(cache, "train", 8, train=True, seed=3, augment=1.0)
    torch.testing.assert_close(again[0], first)
    val = [SegmentDataset(cache, "val", 8, train=False, augment=a) for a in (0.0, 1.0)]
    torch.testing.assert_close(val[0][0], val[1][0])


def test_augmentation_needs_spectra_without_a_per_item_range() -> None:
    with pytest.raises(VqkitError, match="train.augment needs spectral features"):
        load_config(None, ["train.augment=0.5", "features.normalise=minmax"])
    with pytest.raises(VqkitError, match="0..1"):
        load_config(None, ["train.augment=2"])


def test_cache_refuses_unsafe_or_foreign_files(cache_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(VqkitError, match="not a vqkit feature cache"):
        FeatureCache(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("stats.json", "features"):
        (bad / name).symlink_to(cache_dir / name)
    config = json.loads((cache_dir / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "format_version": 99}))
    (bad / "manifest.jsonl").write_text("")
    with pytest.raises(VqkitError, match="format 99; this vqkit reads format 1"):
        FeatureCache(bad)
    (bad / "config.json").write_text(json.dumps(config))
    row = rows_of(cache_dir)[0]
    for key, value in [("path", "../../etc/passwd"), ("features", "/etc/passwd")]:
        (bad / "manifest.jsonl").write_text(json.dumps({**row, key: value}) + "\n")
        with pytest.raises(VqkitError, match="escapes its root"):
            FeatureCache(bad)
    np.save(tmp_path / "evil.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (bad / "manifest.jsonl").write_text(json.dumps(row) + "\n")
    cache = FeatureCache(bad)
    with pytest.raises(VqkitError, match="escapes its root"):
        cache.load({**row, "features": "features/../../evil.npy"})
    (bad / "evil.npy").symlink_to(tmp_path / "evil.npy")
    with pytest.raises(VqkitError, match="cannot read features"):
        cache.load({**row, "features": "evil.npy"})
    with pytest.raises(VqkitError, match="unknown split"):
        cache.items("dev")
