"""The package as a user installs it: a wheel built from the source, installed into a fresh
environment that already has PyTorch, which it must keep; the shipped model encodes and decodes
from there with no source tree on the path.

``pyproject.toml`` declares the torch range vqkit supports (the Makefile pins one build for its
own venv): a library pinned to one torch release would replace a user's torch, or fail to install.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent


def run(argv: list[object], cwd: Path, timeout: int = 240) -> str:
    """Run ``argv`` without the source tree on the path and with pip's own config switched off
    (no site index, no local wheel folder): only what the test hands it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_"))}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", OMP_NUM_THREADS="1")
    done = subprocess.run(
        [str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, (argv, done.stdout[-2000:], done.stderr[-2000:])
    return done.stdout


def build_wheel(tmp_path: Path) -> Path:
    """The wheel of a copy of the source (so the build leaves nothing in the tree), built with
    the setuptools already installed: no network."""
    source = tmp_path / "source"
    shutil.copytree(REPO / "vqkit", source / "vqkit", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
        + ["--no-index", "--wheel-dir", tmp_path / "dist", source],
        cwd=tmp_path,
    )
    (wheel,) = (tmp_path / "dist").glob("vqkit-*.whl")
    return wheel


def environment_with_torch(tmp_path: Path) -> Path:
    """A fresh venv that sees this environment's packages (torch among them) but not vqkit: its
    site-packages gets a ``.pth`` line naming a folder of links to every package here except
    vqkit's own. Returns the venv's python."""
    here = Path(sysconfig.get_paths()["purelib"])
    if not (here / "torch").is_dir():
        pytest.skip(f"torch is not installed in {here}")
    shared = tmp_path / "shared"
    shared.mkdir()
    for entry in here.iterdir():
        if not entry.name.lower().startswith(("vqkit", "__editable__")) and entry.suffix != ".pth":
            (shared / entry.name).symlink_to(entry)
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path)
    python = venv / "bin" / "python"
    site = run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path
    )
    (Path(site.strip()) / "shared.pth").write_text(f"{shared}\n")
    return python


def test_declared_torch_is_a_range_not_one_release() -> None:
    """The source's requirement admits the torch in use and others (2.4 up), not one pin."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (torch_requirement,) = [r for r in project["dependencies"] if r.startswith("torch")]
    spec = Requirement(torch_requirement).specifier
    assert spec.contains("2.4.0") and spec.contains("2.99.0"), torch_requirement
    assert spec.contains(torch.__version__.split("+")[0]), (torch_requirement, torch.__version__)


@pytest.mark.slow
def test_the_wheel_installs_beside_torch_and_runs_the_shipped_model(tmp_path: Path) -> None:
    """About 15 s: build, install with pip resolving every dependency against what is there (no
    index: a requirement the present torch did not meet would fail), then encode and decode."""
    python = environment_with_torch(tmp_path)
    wheel = build_wheel(tmp_path)
    pip = [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-index"]
    run([*pip, "--find-links", wheel.parent, "vqkit"], cwd=tmp_path)
    where = tmp_path / "elsewhere"  # no source tree here, none on the path
    where.mkdir()
    probe = "import torch, vqkit; print(vqkit.__file__); print(torch.__file__, torch.__version__)"
    vqkit_file, torch_line = run([python, "-c", probe], cwd=where).splitlines()
    assert Path(vqkit_file).is_relative_to(python.parent.parent), vqkit_file
    torch_file, torch_version = torch_line.split()
    assert Path(torch_file).resolve() == Path(torch.__file__).resolve()  # the same torch,
    assert torch_version == torch.__version__  # not replaced
    assert not any(python.parent.parent.glob("lib/*/site-packages/torch"))
    t = np.arange(16000) / 16000
    sf.write(where / "in.wav", (0.3 * np.sin(2 * np.pi * 150 * t)).astype(np.float32), 16000)
    vqkit = python.parent / "vqkit"
    assert "stages" in run([vqkit, "encode", "in.wav", "x.vqc", "--bitrate", "1.2"], cwd=where)
    run([vqkit, "decode", "x.vqc", "out.wav"], cwd=where)
    wave, rate = sf.read(where / "out.wav")
    assert rate == 16000 and wave.shape == (16000,) and np.abs(wave).max() > 0.01
    (info,) = python.parent.parent.glob("lib/*/site-packages/vqkit-*.dist-info")
    requires = importlib.metadata.Distribution.at(info).requires or []
    assert [r for r in requires if r.startswith("torch")] == ["torch>=2.4"], requires
