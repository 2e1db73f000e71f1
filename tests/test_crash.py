"""Crash safety: ``kill -9`` at any moment leaves every file whole or absent, and a killed training
run resumes from its last checkpoint to exactly the model an uninterrupted run trains. A scan of
the source checks that every file a user keeps is written through :func:`vqkit.files.atomic_path`
and that nothing could run code from a file (unpickling, eval, a shell).

(A killed ``vqkit prepare`` is tested in test_data.py: the rerun completes the cache.)
"""

from __future__ import annotations

import ast
import functools
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import TINY_BARE_CODEC, save_random_codec

import vqkit
from vqkit.checkpoint import load_checkpoint
from vqkit.cli import main
from vqkit.codec.file_io import decode_file, encode_file
from vqkit.config import load_config
from vqkit.files import remove_temporaries
from vqkit.train.log import MetricsLog, read_metrics

RECIPE = """
[model]
kind = "conv1d"
hidden = 16
latent_dim = 8
n_res_blocks = 1
downsample = 2

[bottleneck]
kind = "rvq"
n_codebooks = 2
codebook_size = 16
codebook_dim = 4

[train]
steps = 30
batch_size = 4
segment_frames = 32
warmup_steps = 2
lr = 0.003
log_every = 1
eval_every = 10
checkpoint_every = 5
eval_batches = 2
device = "cpu"
threads = 1
"""

PACKAGE = Path(vqkit.__file__).parent

# `vqkit train` with every step slowed by 20 ms, so the kill lands mid-run on any machine.
SLOW_TRAIN = """
import sys, time
import vqkit.train.loop
step = vqkit.train.loop.train_step
vqkit.train.loop.train_step = lambda *args, **kwargs: (time.sleep(0.02), step(*args, **kwargs))[1]
from vqkit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def logged_steps(run: Path) -> list[int]:
    """Training steps in ``metrics.jsonl``, parsing every line strictly."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [row["step"] for row in map(json.loads, lines) if row["split"] == "train"]


def kill_mid_run(argv: list[str], run: Path) -> int:
    """Start ``vqkit ARGV`` (slowed), SIGKILL it once it has saved a checkpoint and trained on
    past it; returns the last step it logged."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_TRAIN, *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if (run / "checkpoints" / "last.safetensors").exists():
                steps = logged_steps(run)
                if steps and steps[-1] >= 12 and steps[-1] % 5:  # between two checkpoints
                    break
            time.sleep(0.005)
        assert proc.poll() is None, "training ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    return logged_steps(run)[-1]


def test_kill_9_during_training_then_resume(tiny_cache: Path, tmp_path: Path, capsys) -> None:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RECIPE)
    run = tmp_path / "run"
    argv = ["train", str(recipe), "--data", str(tiny_cache), "--run", str(run)]
    killed_at = kill_mid_run(argv, run)

    # What the kill left: every file whole, the last checkpoint behind the last logged step.
    checkpoints = sorted(run.rglob("*.safetensors"))
    assert [p.name for p in checkpoints] == ["best.safetensors", "last.safetensors"]
    for path in checkpoints:
        load_checkpoint(path)
    resumed_from = load_checkpoint(run / "checkpoints" / "last.safetensors").meta["step"]
    assert resumed_from % 5 == 0 and 10 <= resumed_from <= killed_at
    assert logged_steps(run) == list(range(1, killed_at + 1))
    json.loads((run / "config.json").read_text())
    stray = run / "checkpoints" / ".last.safetensors.k1ll3d.tmp"  # as a kill mid-save leaves
    stray.write_bytes(b"half a checkpoint")

    assert main([*argv, "--resume"]) == 0
    capsys.readouterr()
    assert not stray.exists()
    assert load_checkpoint(run / "checkpoints" / "last.safetensors").meta["step"] == 30
    assert logged_steps(run) == list(range(1, 31))  # the lost steps redone, none twice

    whole_argv = ["train", str(recipe), "--data", str(tiny_cache), "--run", str(tmp_path / "whole")]
    assert main(whole_argv) == 0
    capsys.readouterr()
    whole = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.safetensors")
    resumed = load_checkpoint(run / "checkpoints" / "last.safetensors")
    for name, tensor in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], tensor), name

    def losses(folder: Path) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in read_metrics(folder / "metrics.jsonl") if "loss" in r}

    assert losses(run) == losses(tmp_path / "whole")


# ---- a kill at the worst moment inside each writer ---------------------------------------------


def killed_inside(write: Callable[[], object], when: str = "rename") -> None:
    """Run ``write`` in a forked child that SIGKILLs itself at ``when``: "rename" (the temporary
    file is complete, the rename not done) or "write" (halfway through writing audio blocks)."""

    def child() -> None:
        die = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)  # noqa: E731
        if when == "rename":
            os.replace = die
        else:
            real, calls = sf.SoundFile.write, []

            def write_then_die(self, data):
                real(self, data)
                calls.append(1)
                if len(calls) == 2:
                    die()

            sf.SoundFile.write = write_then_die
        write()
        os._exit(0)

    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    process.join(60)
    assert process.exitcode == -signal.SIGKILL


def tiny_model(path: Path, seed: int) -> Path:
    config = load_config(
        None,
        [
            "audio.sample_rate=8000",
            "features.n_fft=128",
            "features.hop_length=32",
            *TINY_BARE_CODEC,
            "codec.chunk_seconds=0.1",
            "codec.gl_iters=1",
        ],
    )
    return save_random_codec(path, config, 65, seed=seed)


def test_kill_9_inside_every_writer(tmp_path: Path) -> None:
    """The old file stays whole (or the new one stays absent); only a hidden temporary file is
    left, which :func:`remove_temporaries` (run by a resumed training) deletes."""
    model = tiny_model(tmp_path / "model.safetensors", seed=0)
    wave = np.sin(np.arange(8000) / 5).astype(np.float32) * 0.5
    sf.write(tmp_path / "in.wav", wave, 8000)
    sf.write(tmp_path / "other.wav", wave[::-1], 8000)
    encode_file(tmp_path / "in.wav", tmp_path / "x.vqc", model=model)
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.append({"step": 1, "split": "train", "loss": 1.0})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    killed_inside(lambda: tiny_model(tmp_path / "model.safetensors", seed=1))
    killed_inside(lambda: encode_file(tmp_path / "other.wav", tmp_path / "x.vqc", model=model))
    killed_inside(lambda: log.append({"step": 2, "split": "train", "loss": 0.5}))
    killed_inside(
        lambda: decode_file(tmp_path / "x.vqc", tmp_path / "out.wav", model=model), "write"
    )

    stray = remove_temporaries(tmp_path)
    assert sorted(p.name.split(".")[1] for p in stray) == ["metrics", "model", "out", "x"]
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert load_checkpoint(tmp_path / "model.safetensors").meta == {"in_shape": [65]}
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "split": "train", "loss": 1.0}]


# ---- the source: kept files are written atomically, nothing is unpickled ----------------------

WRITE_METHODS = {"write_bytes", "write_text", "tofile", "savefig"}
WRITE_CALLS = {"np.save", "np.savez", "np.savez_compressed", "numpy.save", "sf.write"}
WRITE_CALLS |= {"soundfile.write", "save_file", "os.replace", "os.rename", "Image.save"}
WRITE_CALLS |= {f"shutil.{name}" for name in ("copy", "copy2", "copyfile", "copytree", "move")}
SCRATCH = ("atomic_path", "TemporaryDirectory")  # files written inside these are not kept as is
# Writes outside atomic_path, and why they are safe.
UNATOMIC_ALLOWED = {
    ("files.py", "atomic_path"): "the atomic rename itself",
    ("files.py", "_copy_into"): "a device or FIFO gets the finished temporary's bytes",
    ("data/writer.py", "locked"): "the lock file: empty, never read",
    ("data/prepare.py", "_process"): "manifest rows follow their shard; a torn line is dropped",
    ("eval/listen.py", "_wav_base64"): "a WAV into an in-memory buffer, no file",
    ("eval/perceptual.py", "_quiet_stderr"): "opens /dev/null to silence a C library",
}
# Modules allowed to import pickle, and why: each may use it only through a subclass of
# pickle.Unpickler whose find_class admits a fixed set of globals.
PICKLE_ALLOWED = {
    "data/images.py": "CIFAR-10 batches are pickles: a restricted unpickler reads them"
}
FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "dill", "shelve", "marshal", "joblib"}
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__", "os.system", "os.popen", "torch.save"}
FORBIDDEN_CALLS |= {"yaml.load", "pickle.load", "pickle.loads", "torch.jit.load"}


@functools.cache
def package_sources() -> dict[str, ast.Module]:
    """Every module of the package by its path below it (``data/prepare.py``), subpackages too."""
    paths = sorted(PACKAGE.rglob("*.py"))
    return {p.relative_to(PACKAGE).as_posix(): ast.parse(p.read_text(), p.name) for p in paths}


def calls(tree: ast.Module) -> Iterator[tuple[str, ast.Call, tuple[ast.AST, ...]]]:
    """Every call: its dotted name (``np.load``, ``open``), the node and its enclosing nodes."""

    def walk(node: ast.AST, parents: tuple[ast.AST, ...]):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Call):
                yield ast.unparse(child.func), child, parents
            yield from walk(child, (*parents, child))

    yield from walk(tree, ())


def constant(call: ast.Call, keyword: str, position: int | None = None) -> object:
    """The constant value of an argument given by keyword (or position), else None."""
    values = [kw.value for kw in call.keywords if kw.arg == keyword]
    if position is not None and len(call.args) > position:
        values.append(call.args[position])
    return values[0].value if values and isinstance(values[0], ast.Constant) else None


def writes_a_file(name: str, call: ast.Call) -> bool:
    """Whether a call (by its dotted name) creates or changes a file."""
    if name.split(".")[-1] in ("open", "SoundFile"):
        return any(c in str(constant(call, "mode", 1) or "r") for c in "wax+")
    return name in WRITE_CALLS or name.split(".")[-1] in WRITE_METHODS


def test_every_kept_file_is_written_atomically() -> None:
    """Every call that writes a file sits inside ``with atomic_path(...)`` (or a scratch
    ``tempfile.TemporaryDirectory``), or is one of the few listed exceptions."""
    problems = []
    for module, tree in package_sources().items():
        for name, call, parents in calls(tree):
            scratch = [
                item
                for p in parents
                if isinstance(p, ast.With)
                for item in p.items
                if isinstance(item.context_expr, ast.Call)
                and ast.unparse(item.context_expr.func).endswith(SCRATCH)
            ]
            functions = [p.name for p in parents if isinstance(p, ast.FunctionDef)]
            allowed = (module, functions[-1] if functions else "") in UNATOMIC_ALLOWED
            if writes_a_file(name, call) and not scratch and not allowed:
                problems.append(f"{module}:{call.lineno} {name} is not atomic")
    assert not problems, "\n".join(problems)


def test_nothing_in_the_package_can_run_code_from_a_file() -> None:
    """No unpickling (but by a restricted Unpickler), eval, shell, or torch.load of pickles;
    numpy never loads object arrays."""
    problems = []
    for module, tree in package_sources().items():
        allowed = {"pickle"} if module in PICKLE_ALLOWED else set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                roots = {n.split(".")[0] for n in [*names, getattr(node, "module", None) or ""]}
                problems += [f"{module}: imports {n}" for n in roots & FORBIDDEN_MODULES - allowed]
        for name, call, _ in calls(tree):
            where = f"{module}:{call.lineno} {name}"
            if name in FORBIDDEN_CALLS or constant(call, "shell") is True:
                problems.append(f"{where}: may run code")
            if name in ("np.load", "numpy.load") and constant(call, "allow_pickle") is not False:
                problems.append(f"{where} without allow_pickle=False")
            if name == "torch.load" and constant(call, "weights_only") is not True:
                problems.append(f"{where} without weights_only=True")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("module", PICKLE_ALLOWED)
def test_pickles_are_read_only_by_a_restricted_unpickler(module: str) -> None:
    tree = package_sources().get(module)
    if tree is None:
        pytest.skip(f"vqkit/{module} is not in this checkout")
    restricted = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef)
        and [ast.unparse(base) for base in node.bases] == ["pickle.Unpickler"]
        and any(isinstance(f, ast.FunctionDef) and f.name == "find_class" for f in node.body)
    ]
    other = [name for name, _, _ in calls(tree) if name.startswith("pickle.")]
    assert restricted and not other, f"{module}: restricted {restricted}, other uses {other}"
