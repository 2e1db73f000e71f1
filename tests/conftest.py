"""Shared fixtures: a tiny generated speech corpus and a feature cache prepared from it.

Session-scoped, so every test module that needs data pays for generating and preparing it once.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import soundfile as sf
import torch

from vqkit.config import Config, load_config

TINY_SAMPLE_RATE = 8000
TINY_SPEAKERS = ("alice", "bob", "carol")
TINY_UTTERANCES = 4  # per speaker: 12 files in all


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tests use tiny tensors: on a shared 2-core machine one torch thread is many times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def synth_utterance(rng: np.random.Generator, seconds: float, f0: float) -> np.ndarray:
    """A voiced-speech-like signal: harmonics of a gliding f0 under a moving formant, plus noise."""
    t = np.arange(int(seconds * TINY_SAMPLE_RATE)) / TINY_SAMPLE_RATE
    pitch = f0 * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(1, 3) * t))
    phase = 2 * np.pi * np.cumsum(pitch) / TINY_SAMPLE_RATE
    formant = rng.uniform(500, 1500) * (1 + 0.3 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t))
    wave = np.zeros_like(t)
    for k in range(1, 12):
        wave += np.exp(-(((k * pitch - formant) / 600) ** 2)) * np.sin(k * phase) / k
    wave += 0.01 * rng.standard_normal(t.shape)
    envelope = np.clip(np.sin(np.pi * t / t[-1]) * 3, 0, 1)
    return (0.5 * wave * envelope / np.abs(wave).max()).astype(np.float32)


@pytest.fixture(scope="session")
def tiny_speech_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 'folder' corpus: ROOT/<speaker>/<speaker>_<i>.wav, 12 clips of 0.4-0.7 s at 8 kHz."""
    root = tmp_path_factory.mktemp("tiny_speech")
    rng = np.random.default_rng(0)
    for s, speaker in enumerate(TINY_SPEAKERS):
        (root / speaker).mkdir()
        for i in range(TINY_UTTERANCES):
            wave = synth_utterance(rng, rng.uniform(0.4, 0.7), f0=110.0 + 60 * s + 10 * i)
            sf.write(
                root / speaker / f"{speaker}_{i}.wav", wave, TINY_SAMPLE_RATE, subtype="PCM_16"
            )
    return root


@pytest.fixture(scope="session")
def tiny_config() -> Config:
    """The front end the tiny cache is made with: 8 kHz, 65-bin log-magnitude (n_fft 128)."""
    return load_config(
        None,
        [
            f"audio.sample_rate={TINY_SAMPLE_RATE}",
            "features.kind='stft'",
            "features.n_fft=128",
            "features.hop_length=32",
            "data.layout='folder'",
            "data.val_fraction=0.25",
            "data.test_fraction=0.25",
        ],
    )


@pytest.fixture(scope="session")
def tiny_cache(
    tiny_speech_dir: Path, tiny_config: Config, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A feature cache prepared from ``tiny_speech_dir`` with ``tiny_config``."""
    from vqkit.data.prepare import prepare

    out = tmp_path_factory.mktemp("tiny_cache") / "cache"
    summary = prepare(tiny_speech_dir, out, tiny_config, workers=1)
    assert summary.n_ok == len(TINY_SPEAKERS) * TINY_UTTERANCES
    return out


# Random-weight codec models for tests that need a checkpoint but no training.
TINY_BARE_CODEC = [  # 2 stages of 16 codes, no k-means (its codes barely vary): the fastest
    "model.hidden=16",
    "model.latent_dim=8",
    "model.n_res_blocks=1",
    "bottleneck.kind='rvq'",
    "bottleneck.n_codebooks=2",
    "bottleneck.codebook_size=16",
    "bottleneck.kmeans_init=false",
]
TINY_RVQ_CODEC = [  # 4 stages of 64 codes on an 8-d lookup, 4x time decimation
    "model.hidden=32",
    "model.latent_dim=16",
    "model.n_res_blocks=1",
    "model.downsample=4",
    "bottleneck.kind='rvq'",
    "bottleneck.n_codebooks=4",
    "bottleneck.codebook_size=64",
    "bottleneck.codebook_dim=8",
]


def save_random_codec(
    path: Path,
    config: Config,
    n_bins: int,
    *,
    seed: int = 0,
    mean: float = -40.0,
    std: float = 20.0,
    kmeans_on: torch.Tensor | None = None,
    meta: dict | None = None,
) -> Path:
    """Save a random-weight model of ``config`` on ``n_bins`` features as a real checkpoint
    (safetensors, config, a fixed mean/std normaliser). ``kmeans_on``, features ``(B, n_bins, N)``
    in dB, initialises its codebooks by one training-mode pass, so that its codes vary."""
    from vqkit.checkpoint import save_checkpoint
    from vqkit.nn.model import build_model

    torch.manual_seed(seed)
    model = build_model(config, (n_bins,))
    if kmeans_on is not None:
        with torch.no_grad():
            model.train()((kmeans_on - mean) / std)
    if model.normaliser.meanstd is not None:
        model.normaliser.set_statistics(torch.full((n_bins,), mean), torch.full((n_bins,), std))
    save_checkpoint(path, model, config, meta={"in_shape": [n_bins], **(meta or {})})
    return path


TINY_PARAMETRIC_RATE, TINY_PARAMETRIC_K = 8000, 20  # a tiny parametric codec: rate, envelope points


def tiny_parametric_config(*overrides: str) -> Config:
    """A tiny parametric codec's config at 8 kHz (envelope, pitch and voicing; harmonic
    synthesis), for a random-weight model saved by :func:`save_random_codec`."""
    return load_config(
        None,
        [
            f"audio.sample_rate={TINY_PARAMETRIC_RATE}",
            "features.kind='envelope'",
            "features.n_fft=512",
            "features.win_length=320",
            "features.hop_length=80",
            f"features.rate_k={TINY_PARAMETRIC_K}",
            *TINY_RVQ_CODEC,
            "codec.synthesis='harmonic'",
            "codec.chunk_seconds=0.2",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    """1.5 s of speech-like audio at 8 kHz with an odd length."""
    rng = np.random.default_rng(0)
    return np.concatenate([synth_utterance(rng, 0.5, f0) for f0 in (120, 200, 160)])[:-3]


# the four bundled held-out prompts the shipped codec is measured on
SAMPLE = sorted((Path(__file__).resolve().parents[1] / "vqkit/assets/sample").glob("*.flac"))


def load_script(name: str) -> ModuleType:
    """The module of ``scripts/NAME.py``, to call its functions."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
