"""The trainer: exact resumption, Ctrl-C, two-process DDP, the CLI end to end, and its parts."""

from __future__ import annotations

import json
import math
import signal
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from vqkit.audio.frontends import make_frontend
from vqkit.checkpoint import load_checkpoint
from vqkit.cli import main
from vqkit.config import Config, load_config
from vqkit.data.cache import FeatureCache
from vqkit.errors import VqkitError
from vqkit.nn.codebook import Codebook, CodebookOptions, code_stats
from vqkit.nn.normalise import Normaliser
from vqkit.train import loop as train_module
from vqkit.train.distributed import batch_indices
from vqkit.train.log import StopOnInterrupt, read_metrics
from vqkit.train.loop import make_scheduler, train
from vqkit.train.losses import LossWeights, band_weights, reconstruction_loss

RECIPES = Path(__file__).resolve().parents[1] / "configs"
TINY_MODEL = [
    "model.hidden=32",
    "model.latent_dim=16",
    "model.n_res_blocks=1",
    "model.downsample=2",
    "train.batch_size=4",
    "train.segment_frames=32",
    "train.warmup_steps=2",
    "train.lr=0.003",
    "train.device='cpu'",
    "train.threads=1",
]
TINY_RVQ = [
    "bottleneck.kind='rvq'",
    "bottleneck.n_codebooks=3",
    "bottleneck.codebook_size=16",
    "bottleneck.codebook_dim=8",
    "bottleneck.quantizer_dropout=0.5",
]


def tiny_train_config(*overrides: str) -> Config:
    return load_config(RECIPES / "speech_rvq.toml", [*TINY_MODEL, *TINY_RVQ, *overrides])


def train_rows(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"}


def test_resume_after_ctrl_c_equals_an_uninterrupted_run(
    tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tiny_train_config("train.steps=6", "train.log_every=1", "train.eval_every=4")
    whole = train(config, data=tiny_cache, run=tmp_path / "whole")

    calls = []
    real_step = train_module.train_step

    def interrupted_step(*args: object, **kwargs: object) -> dict:
        calls.append(1)
        row = real_step(*args, **kwargs)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)  # as if Ctrl-C arrived during step 3
        return row

    monkeypatch.setattr(train_module, "train_step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        train(config, data=tiny_cache, run=tmp_path / "split")
    monkeypatch.setattr(train_module, "train_step", real_step)
    last = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.safetensors")
    assert last.meta["step"] == 3
    with pytest.raises(VqkitError, match="already holds a checkpoint.*--resume"):
        train(config, data=tiny_cache, run=tmp_path / "split")

    resumed = train(config, data=tiny_cache, run=tmp_path / "split", resume=True)
    assert resumed.step == whole.step == 6
    expected = whole.model.state_dict()
    for name, tensor in resumed.model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    rows_whole, rows_split = train_rows(tmp_path / "whole"), train_rows(tmp_path / "split")
    assert sorted(rows_split) == list(range(1, 7))  # no step logged twice
    for step in range(1, 7):
        assert rows_split[step]["loss"] == rows_whole[step]["loss"], step
    assert resumed.val == whole.val


def test_cli_end_to_end(tiny_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    argv = ["train", str(RECIPES / "fsdd_vqvae.toml"), "--data", str(tiny_cache), "--run", str(run)]
    tiny = [*TINY_MODEL, "bottleneck.codebook_size=32", "train.steps=6", "train.log_every=2"]
    tiny += ["train.eval_every=3", "train.checkpoint_every=3", "train.augment=0.5"]
    sets = [arg for value in tiny for arg in ("--set", value)]
    assert main([*argv, *sets]) == 0

    rows = read_metrics(run / "metrics.jsonl")
    assert all(isinstance(r["step"], int) and r["split"] in ("train", "val", "test") for r in rows)
    assert [r["step"] for r in rows if r["split"] == "train"] == [2, 4, 6]
    val = [r for r in rows if r["split"] == "val"]
    assert [r["step"] for r in val] == [3, 6]
    for key in ("recon", "sd_db", "usage/0", "perplexity/0"):
        assert all(math.isfinite(r[key]) for r in val), key
    (test,) = [r for r in rows if r["split"] == "test"]
    assert test["step"] == min(val, key=lambda r: r["objective"])["step"]
    assert 0 < test["usage/0"] <= 1 and test["sd_db"] > 0
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    cache = FeatureCache(tiny_cache)
    saved = json.loads((run / "config.json").read_text())
    last = load_checkpoint(run / "checkpoints" / "last.safetensors")
    best = load_checkpoint(run / "checkpoints" / "best.safetensors")
    assert (
        saved["features"] == json.loads(cache.root.joinpath("config.json").read_text())["features"]
    )
    assert last.config == best.config
    assert saved["model"]["hidden"] == last.config.model.hidden == 32
    assert saved["train"]["augment"] == last.config.train.augment == 0.5
    assert last.meta["step"] == 6 and last.optimizer is not None and best.optimizer is None
    assert torch.equal(last.model.normaliser.meanstd.mean, torch.from_numpy(cache.stats["mean"]))
    capsys.readouterr()

    assert main([*argv, *sets]) == 1
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert main([*argv, *sets, "--set", "train.steps=8", "--resume"]) == 0
    assert load_checkpoint(run / "checkpoints" / "last.safetensors").meta["step"] == 8
    assert main([*argv, *sets, "--set", "model.hidden=64", "--resume"]) == 1
    assert "different config: model.hidden 32 -> 64" in capsys.readouterr().err


def test_resume_needs_a_checkpoint(tiny_cache: Path, tmp_path: Path) -> None:
    with pytest.raises(VqkitError, match="cannot resume.*last.safetensors does not exist"):
        train(tiny_train_config("train.steps=1"), data=tiny_cache, run=tmp_path, resume=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_worker(rank: int, port: int, cache: Path, out: Path) -> None:
    """One torchrun-like process: the variables torchrun sets, then train; dump the replica."""
    import os

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank)
    )
    os.environ["WORLD_SIZE"] = "2"
    config = tiny_train_config("train.steps=40", "train.log_every=1", "train.recon_loss='mse'")
    result = train(config, data=cache, run=out / "run")
    state = {k: v.detach().clone().contiguous() for k, v in result.model.state_dict().items()}
    save_file(state, str(out / f"rank{rank}.safetensors"))


def test_two_process_ddp_keeps_replicas_identical(tiny_cache: Path, tmp_path: Path) -> None:
    mp.spawn(ddp_worker, args=(free_port(), tiny_cache, tmp_path), nprocs=2, join=True)
    rank0 = load_file(str(tmp_path / "rank0.safetensors"))
    rank1 = load_file(str(tmp_path / "rank1.safetensors"))
    assert rank0.keys() == rank1.keys()
    codebooks = [k for k in rank0 if "codebook" in k]
    assert codebooks
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    rows = train_rows(tmp_path / "run")
    assert sorted(rows) == list(range(1, 41))  # rank 0 alone writes
    first = sum(rows[s]["recon"] for s in range(1, 6)) / 5
    last = sum(rows[s]["recon"] for s in range(31, 41)) / 10
    assert last < 0.9 * first
    assert (
        load_checkpoint(tmp_path / "run" / "checkpoints" / "last.safetensors").meta["world_size"]
        == 2
    )


def test_batch_indices_shard_each_epoch_without_overlap() -> None:
    n_items, batch_size = 23, 4
    per_epoch = (n_items // 2) // batch_size  # 2 steps per epoch on each of 2 ranks
    for epoch in range(3):
        steps = range(epoch * per_epoch, (epoch + 1) * per_epoch)
        seen = [
            [i for step in steps for i in batch_indices(step, n_items, batch_size, 7, rank, 2)]
            for rank in (0, 1)
        ]
        assert len(set(seen[0])) == len(seen[0]) == 8 and len(set(seen[1])) == 8
        assert not set(seen[0]) & set(seen[1])
    assert batch_indices(5, n_items, batch_size, 7) == batch_indices(5, n_items, batch_size, 7)
    assert batch_indices(0, n_items, batch_size, 7) != batch_indices(5, n_items, batch_size, 7)
    small = batch_indices(0, 3, 8, 0)  # a shard smaller than a batch wraps around
    assert len(small) == 8 and set(small) == {0, 1, 2}
    with pytest.raises(VqkitError, match="cannot be shared among 4 processes"):
        batch_indices(0, 3, 8, 0, rank=0, world_size=4)


def test_schedule_warms_up_then_decays_to_zero() -> None:
    config = load_config(None, ["train.steps=100", "train.warmup_steps=10", "train.lr=0.01"])
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    scheduler = make_scheduler(optimizer, config)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(0.001) and lrs[9] == pytest.approx(0.01)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10], strict=True))
    assert all(a >= b for a, b in zip(lrs[9:-1], lrs[10:], strict=True))
    assert lrs[55] == pytest.approx(0.005) and lrs[-1] < 1e-4


def test_high_band_weight_scales_the_loss_of_rows_above_the_split() -> None:
    config = load_config(RECIPES / "speech_parametric.toml", ["train.high_band_weight=0.25"])
    rows = band_weights(config)
    freqs = make_frontend(config.features, config.audio.sample_rate).frequencies()
    assert rows.shape == (config.features.rate_k, 1)
    assert torch.equal(rows[:, 0], torch.tensor(np.where(freqs > 4000.0, 0.25, 1.0)).float())
    unweighted = load_config(RECIPES / "speech_parametric.toml", ["train.high_band_weight=1"])
    assert band_weights(unweighted) is None

    x = torch.zeros(2, len(rows), 5)
    low, high = x.clone(), x.clone()
    low[:, 0], high[:, -1] = 1.0, 1.0  # the same error, in the lowest row or the highest
    plain = [reconstruction_loss(y, x, "l1+mse") for y in (low, high)]
    weighted = [reconstruction_loss(y, x, "l1+mse", rows) for y in (low, high)]
    assert plain[0] == plain[1]
    assert weighted[0] / weighted[1] == pytest.approx(4.0)  # 1 against 0.25
    assert reconstruction_loss(low, x, "mse", torch.ones(len(rows), 1)) == plain[0] / 2
    with pytest.raises(VqkitError, match="needs audio features"):
        load_config(RECIPES / "image_vqvae.toml", ["train.high_band_weight=0.5"])
    nothing = ["train.high_band_weight=0", "train.band_split_hz=0"]
    with pytest.raises(VqkitError, match="leaves no feature row"):
        band_weights(load_config(RECIPES / "speech_parametric.toml", nothing))


def test_loudness_weight_counts_each_error_by_the_true_level() -> None:
    config = load_config(RECIPES / "speech_parametric.toml", ["train.loudness_weight=0.23"])
    rows = band_weights(config)  # the recipe's high band counts half
    mean, std = torch.full((len(rows),), -30.0), torch.full((len(rows),), 10.0)
    weights = LossWeights(config, Normaliser("meanstd", mean, std))
    x_db = torch.zeros(1, len(rows), 3)
    x_db[0, :, 0] = -40.0  # a pause 40 dB below the rest
    x_db[0, -1, 1:] = -20.0  # and the top row 20 dB below the others when they speak
    x = (x_db + 30.0) / 10.0  # normalised, as training sees it
    w = weights(x, x)
    assert w.shape == x.shape
    assert torch.allclose(w[0, :, 0], 10 ** (-0.023 * 40) * rows[:, 0])
    assert torch.allclose(w[0, :-1, 1:], rows[:-1].expand(-1, 2))
    assert torch.allclose(w[0, -1, 1:], 10 ** (-0.023 * 20) * rows[-1].expand(2))
    quiet, loud = x.clone(), x.clone()
    quiet[0, 0, 0] += 1.0  # the same error, in the pause or in speech
    loud[0, 0, 1] += 1.0
    ratio = reconstruction_loss(quiet, x, "l1+mse", w) / reconstruction_loss(loud, x, "l1+mse", w)
    assert ratio.item() == pytest.approx(10 ** (-0.92), rel=1e-5)
    plain = LossWeights(load_config(RECIPES / "speech_rvq.toml", []), weights.normaliser)
    assert plain(x, x) is None
    with pytest.raises(VqkitError, match="loudness_weight needs spectral features"):
        load_config(RECIPES / "image_vqvae.toml", ["train.loudness_weight=0.23"])


def test_overshoot_weight_counts_errors_above_the_truth_more() -> None:
    settings = ["train.overshoot_weight=2", "train.high_band_weight=1"]
    config = load_config(RECIPES / "speech_parametric.toml", settings)
    rows = len(band_weights(load_config(RECIPES / "speech_parametric.toml", [])))
    weights = LossWeights(config, Normaliser("meanstd", torch.zeros(rows), torch.ones(rows)))
    x = torch.zeros(1, rows, 4)
    over, under = x.clone(), x.clone()
    over[0, 0, 0], under[0, 0, 0] = 1.0, -1.0  # the same error, above the truth or below
    assert torch.equal(weights(x, over)[0, :, 1:], torch.ones(rows, 3))
    assert weights(x, over)[0, 0, 0] == 2.0 and weights(x, under)[0, 0, 0] == 1.0
    errors = [(weights(x, y) * (y - x).abs()).sum() for y in (over, under)]  # before scaling
    assert errors[0] == 2 * errors[1]
    with pytest.raises(VqkitError, match="overshoot_weight"):
        load_config(RECIPES / "speech_parametric.toml", ["train.overshoot_weight=-1"])


@pytest.mark.parametrize(
    "weighting",
    ["train.high_band_weight=0.2", "train.loudness_weight=0.23", "train.overshoot_weight=3"],
)
def test_training_weights_the_loss_and_keeps_the_best_by_it(
    weighting: str, tiny_cache: Path, tmp_path: Path
) -> None:
    first = {}
    for name, setting in (("plain", "train.high_band_weight=1"), ("weighted", weighting)):
        split = "train.band_split_hz=1000"  # the tiny cache is at 8 kHz
        config = tiny_train_config(
            "train.steps=4", "train.eval_every=1", "train.log_every=1", setting, split
        )
        train(config, data=tiny_cache, run=tmp_path / name)
        first[name] = train_rows(tmp_path / name)[1]["recon"]
    assert math.isfinite(first["weighted"]) and first["weighted"] != first["plain"]  # reweighted
    rows = read_metrics(tmp_path / "weighted" / "metrics.jsonl")
    val = [r for r in rows if r["split"] == "val"]
    assert all(r["objective"] != r["recon"] for r in val)  # both reported, the plain to compare
    best = load_checkpoint(tmp_path / "weighted" / "checkpoints" / "best.safetensors")
    assert best.meta["step"] == min(val, key=lambda r: r["objective"])["step"]
    assert best.meta["best_metric"] == "val/objective"


def test_init_fine_tunes_a_trained_model(
    tiny_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    base = train(tiny_train_config("train.steps=4"), data=tiny_cache, run=tmp_path / "base")
    started = load_checkpoint(tmp_path / "base" / "checkpoints" / "best.safetensors")
    # a learning rate too small to move the weights: the run keeps what it started from
    config = tiny_train_config("train.steps=2", "train.lr=1e-12", "train.loudness_weight=0.23")
    tuned = train(config, data=tiny_cache, run=tmp_path / "tuned", init=tmp_path / "base")
    before, after = started.model.state_dict(), tuned.model.state_dict()
    for name in before:
        if name.startswith(("encoder.", "decoder.", "normaliser.")):
            assert torch.allclose(after[name], before[name], atol=1e-6), name
    fresh = train(config, data=tiny_cache, run=tmp_path / "fresh").model.state_dict()
    decoder = [name for name in before if name.startswith("decoder.")]
    assert any(not torch.allclose(fresh[name], before[name]) for name in decoder)
    last = load_checkpoint(tmp_path / "tuned" / "checkpoints" / "last.safetensors")
    assert last.meta["init"] == started.model_id and "init" not in started.meta
    assert base.step == 4 and tuned.step == 2

    with pytest.raises(VqkitError, match=r"another model.*model.hidden 32 -> 16"):
        narrower = tiny_train_config("train.steps=1", "model.hidden=16")
        train(narrower, data=tiny_cache, run=tmp_path / "other", init=tmp_path / "base")
    with pytest.raises(VqkitError, match="only one of them"):
        train(config, data=tiny_cache, run=tmp_path / "tuned", resume=True, init="default")
    argv = ["train", str(RECIPES / "speech_rvq.toml"), "--data", str(tiny_cache)]
    argv += ["--run", str(tmp_path / "cli"), "--init", "default"]
    capsys.readouterr()  # the progress bars so far
    assert main(argv) != 0  # the shipped default is a 16 kHz envelope model
    err = capsys.readouterr().err.strip()
    assert err.startswith("vqkit: error: cannot start from default") and "\n" not in err


def test_codebook_restart_learns_afresh_from_its_vectors() -> None:
    codebook = Codebook(8, 4, CodebookOptions(kmeans_init=False))
    codebook.update(torch.randn(64, 4), torch.randint(0, 8, (64,)))
    vectors = codebook.vectors.clone()
    codebook.restart()
    assert torch.equal(codebook.vectors, vectors) and torch.equal(codebook.embed_sum, vectors)
    assert torch.equal(codebook.cluster_size, torch.ones(8))
    assert not codebook.usage.any() and int(codebook.steps) == 0


def test_code_stats() -> None:
    counts = torch.tensor([[5, 5, 0, 0], [1, 1, 1, 1]])
    stats = code_stats(counts)
    assert stats["usage/0"] == 0.5 and stats["perplexity/0"] == pytest.approx(2.0)
    assert stats["usage/1"] == 1.0 and stats["perplexity/1"] == pytest.approx(4.0)


def test_first_signal_requests_a_stop_and_a_second_aborts() -> None:
    before = {s: signal.getsignal(s) for s in StopOnInterrupt.SIGNALS}
    for signum in StopOnInterrupt.SIGNALS:
        with StopOnInterrupt() as stop:
            signal.raise_signal(signum)
            assert stop.requested and stop.interrupted().signum == signum
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(signum)
    assert {s: signal.getsignal(s) for s in StopOnInterrupt.SIGNALS} == before
