"""Checkpoints: exact round trips, resumable optimizer state, and clear errors for bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vqkit.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint
from vqkit.config import SAVED_BEFORE, Config, load_config
from vqkit.errors import VqkitError
from vqkit.nn.model import build_model
from vqkit.run import resolve_model

IN_SHAPE = (12,)


def tiny_config(*overrides: str) -> Config:
    base = ["model.hidden=16", "model.latent_dim=8", "model.n_res_blocks=1", "model.downsample=2"]
    return load_config(None, [*base, "bottleneck.codebook_size=16", *overrides])


def trained_model(config: Config, steps: int = 2) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A model with non-initial weights and buffers, and its optimizer with state."""
    torch.manual_seed(0)
    model = build_model(config, IN_SHAPE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(steps):
        out = model(torch.randn(4, *IN_SHAPE, 16))
        loss = out.x_hat.square().mean() + out.bottleneck.loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), optimizer


@pytest.mark.parametrize(
    "bottleneck", ["kind='vq'", "kind='rvq'", "kind='gaussian'", "kind='identity'", "kind='fsq'"]
)
def test_round_trip_is_exact(tmp_path: Path, bottleneck: str) -> None:
    n_codebooks = 2 if "rvq" in bottleneck else 1
    config = tiny_config(f"bottleneck.{bottleneck}", f"bottleneck.n_codebooks={n_codebooks}")
    model, _ = trained_model(config)
    model.normaliser.set_statistics(torch.randn(12), torch.rand(12) + 0.5)
    extra = {"extra.scale": torch.randn(3)}
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, model, config, tensors=extra, meta={"step": 7, "in_shape": [12]})

    loaded = load_checkpoint(path)
    assert loaded.config == config
    assert loaded.meta == {"step": 7, "in_shape": [12]}
    assert loaded.tensors.keys() == extra.keys()
    assert torch.equal(loaded.tensors["extra.scale"], extra["extra.scale"])
    reference = model.state_dict()
    assert loaded.model.state_dict().keys() == reference.keys()
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
    assert not loaded.model.training
    x = torch.randn(2, *IN_SHAPE, 20)
    with torch.no_grad():
        assert torch.equal(loaded.model(x).x_hat, model(x).x_hat)
    assert loaded.optimizer is None and loaded.scheduler is None
    assert len(loaded.model_id) == 16
    assert load_checkpoint(path).model_id == loaded.model_id


def test_a_compact_checkpoint_codes_alike_in_less_space(tmp_path: Path) -> None:
    config = tiny_config("bottleneck.kind='rvq'", "bottleneck.n_codebooks=3")
    model, _ = trained_model(config)
    full, compact = tmp_path / "full.safetensors", tmp_path / "compact.safetensors"
    save_checkpoint(full, model, config, meta={"in_shape": [12]})
    save_checkpoint(compact, model, config, meta={"in_shape": [12]}, compact=True)
    stored = load_file(compact)
    assert not any(k.endswith(("cluster_size", "embed_sum", "usage")) for k in stored)
    assert {v.dtype for k, v in stored.items() if k.startswith("model.decoder.")} == {torch.float16}
    assert {v.dtype for k, v in stored.items() if k.startswith("model.encoder.")} == {torch.float32}
    assert compact.stat().st_size < 0.8 * full.stat().st_size
    x = torch.randn(2, *IN_SHAPE, 20)
    with torch.no_grad():
        a, b = load_checkpoint(full).model(x), load_checkpoint(compact).model(x)
    assert torch.equal(a.bottleneck.codes, b.bottleneck.codes)
    torch.testing.assert_close(a.x_hat, b.x_hat, atol=1e-2, rtol=1e-2)
    assert load_checkpoint(compact).model_id != load_checkpoint(full).model_id


def test_keys_added_later_keep_the_ids_of_models_saved_before_them(tmp_path: Path) -> None:
    """A checkpoint whose config predates a key (its JSON lacks it) keeps its model id: keys of
    SAVED_BEFORE at those values are left out of the id; away from them they count."""
    config = tiny_config()
    model, _ = trained_model(config)
    new = tmp_path / "new.safetensors"
    save_checkpoint(new, model, config, meta={"in_shape": [12]})
    with safe_open(str(new), "pt") as f:
        metadata = f.metadata()
    values = json.loads(metadata["config"])
    for section, key in SAVED_BEFORE:
        del values[section][key]
    old = tmp_path / "old.safetensors"
    save_file(load_file(new), str(old), metadata={**metadata, "config": json.dumps(values)})
    assert load_checkpoint(old).model_id == load_checkpoint(new).model_id
    assert load_checkpoint(old).config.features.pitch == "yin"  # what it was made with
    assert load_checkpoint(new).config.features.pitch == "tracked"
    causal = tmp_path / "causal.safetensors"
    save_checkpoint(
        causal, model, tiny_config("model.encoder_lookahead=0"), meta={"in_shape": [12]}
    )
    assert load_checkpoint(causal).model_id != load_checkpoint(new).model_id


def test_model_id_tracks_weights_and_config(tmp_path: Path) -> None:
    config = tiny_config()
    model, _ = trained_model(config)
    save_checkpoint(tmp_path / "a.safetensors", model, config, meta={"in_shape": [12]})
    other_config = tiny_config("train.lr=0.1")
    save_checkpoint(tmp_path / "b.safetensors", model, other_config, meta={"in_shape": [12]})
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    save_checkpoint(tmp_path / "c.safetensors", model, config, meta={"in_shape": [12]})
    ids = {load_checkpoint(tmp_path / f"{n}.safetensors").model_id for n in "abc"}
    assert len(ids) == 3


def test_optimizer_and_scheduler_state_round_trip(tmp_path: Path) -> None:
    config = tiny_config()
    model, optimizer = trained_model(config, steps=3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))
    optimizer.step()
    scheduler.step()
    path = tmp_path / "last.safetensors"
    meta = {"in_shape": [12]}
    save_checkpoint(path, model, config, meta=meta, optimizer=optimizer, scheduler=scheduler)

    loaded = load_checkpoint(path)
    fresh = torch.optim.AdamW(loaded.model.parameters(), lr=1e-3)
    fresh.load_state_dict(loaded.optimizer)
    expected, actual = optimizer.state_dict(), fresh.state_dict()
    assert actual["param_groups"] == expected["param_groups"]
    for index, state in expected["state"].items():
        for key, value in state.items():
            assert torch.equal(actual["state"][index][key], value), (index, key)
    assert loaded.scheduler["last_epoch"] == scheduler.state_dict()["last_epoch"] == 1
    assert not any(k.startswith("optimizer.") for k in loaded.tensors)


def test_failed_save_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tiny_config()
    model, _ = trained_model(config)
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, model, config, meta={"in_shape": [12], "step": 1})
    before = path.read_bytes()

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("vqkit.checkpoint.save_file", broken)
    with pytest.raises(VqkitError, match="cannot write .*last.safetensors: disk full"):
        save_checkpoint(path, model, config, meta={"in_shape": [12], "step": 2})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.safetensors"]


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(VqkitError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_pickled_torch_file_is_refused(tmp_path: Path) -> None:
    model, _ = trained_model(tiny_config())
    path = tmp_path / "model.pt"
    torch.save({"model": model.state_dict()}, path)
    with pytest.raises(VqkitError, match="pickled PyTorch file.*refuses to unpickle"):
        load_checkpoint(path)
    legacy = tmp_path / "legacy.pt"
    torch.save(model.state_dict(), legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(VqkitError, match="pickled"):
        load_checkpoint(legacy)


def test_garbage_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "noise.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    with pytest.raises(VqkitError, match="not a safetensors checkpoint"):
        load_checkpoint(path)


def test_foreign_safetensors_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3)}, str(path))
    with pytest.raises(VqkitError, match="not a vqkit checkpoint"):
        load_checkpoint(path)


def rewrite_metadata(path: Path, **changes: str) -> None:
    """Rewrite a checkpoint with some metadata fields replaced, keeping its tensors."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
    save_file(load_file(str(path)), str(path), metadata={**metadata, **changes})


def test_wrong_version_bad_config_and_foreign_weights(tmp_path: Path) -> None:
    config = tiny_config()
    model, _ = trained_model(config)
    path = tmp_path / "model.safetensors"
    meta = {"in_shape": [12]}

    save_checkpoint(path, model, config, meta=meta)
    rewrite_metadata(path, version=str(FORMAT_VERSION + 1))
    with pytest.raises(VqkitError, match=f"version {FORMAT_VERSION + 1}.*reads version"):
        load_checkpoint(path)

    save_checkpoint(path, model, config, meta=meta)
    rewrite_metadata(path, config=json.dumps({"model": {"hiden": 16}}))
    with pytest.raises(VqkitError, match="config this vqkit cannot load.*did you mean 'hidden'"):
        load_checkpoint(path)

    save_checkpoint(path, model, config, meta=meta)
    bigger = json.dumps({"model": {"hidden": 32, "latent_dim": 8, "n_res_blocks": 1}})
    rewrite_metadata(path, config=bigger)
    with pytest.raises(VqkitError, match="checkpoint from another model"):
        load_checkpoint(path)


def test_resolve_model(tmp_path: Path) -> None:
    config = tiny_config()
    model, _ = trained_model(config)
    run = tmp_path / "run"
    with pytest.raises(VqkitError, match="without checkpoints"):
        resolve_model(run.parent)
    save_checkpoint(
        run / "checkpoints" / "best.safetensors", model, config, meta={"in_shape": [12]}
    )
    assert resolve_model(run) == run / "checkpoints" / "best.safetensors"
    assert resolve_model(str(run / "checkpoints" / "best.safetensors")).is_file()
    with pytest.raises(VqkitError, match="does not exist"):
        resolve_model(tmp_path / "missing.safetensors")
    try:
        default = resolve_model("default")
    except VqkitError as e:
        assert "no default model" in str(e)
    else:
        assert default.name == "default.safetensors" and default.is_file()


def test_a_checkpoint_with_the_normaliser_beside_the_weights_still_loads(tmp_path: Path) -> None:
    """Checkpoints written before the normaliser joined the model (the shipped one among them)
    keep its statistics as "norm.mean" and "norm.std": they load into ``model.normaliser``, and
    the model id, which leaves the normaliser out, is the same either way."""
    config = tiny_config("features.normalise='meanstd'")
    model, _ = trained_model(config)
    mean, std = torch.randn(12), torch.rand(12) + 0.5
    legacy = {k: v for k, v in model.state_dict().items() if not k.startswith("normaliser.")}
    flat = {f"model.{k}": v.contiguous() for k, v in legacy.items()}
    flat |= {"norm.mean": mean, "norm.std": std}
    save_file(flat, str(tmp_path / "old.safetensors"), metadata=_metadata(config))
    model.normaliser.set_statistics(mean, std)
    save_checkpoint(tmp_path / "new.safetensors", model, config, meta={"in_shape": [12]})

    old, new = (load_checkpoint(tmp_path / f"{n}.safetensors") for n in ("old", "new"))
    assert torch.equal(old.model.normaliser.meanstd.mean, mean) and not old.tensors
    assert torch.equal(old.model.normaliser.meanstd.std, new.model.normaliser.meanstd.std)
    assert old.model_id == new.model_id


def _metadata(config: Config) -> dict[str, str]:
    from vqkit.config import config_to_dict

    return {
        "format": "vqkit-checkpoint",
        "version": str(FORMAT_VERSION),
        "config": json.dumps(config_to_dict(config), sort_keys=True),
        "meta": json.dumps({"in_shape": [12]}),
    }
