"""The teaching tools end to end through the CLI: ``vqkit viz vq``, ``vqkit pager`` (in headless
Chromium), ``vqkit generate`` and ``vqkit export`` (TorchScript and ONNX against the eager model).

Models are tiny and untrained (random weights, the tiny cache's statistics): every check here is
about the tools, not about what a model learned.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from browser import dump_dom, needs_chromium
from PIL import Image

from vqkit.checkpoint import load_checkpoint, save_checkpoint
from vqkit.cli import main
from vqkit.config import Config, replace
from vqkit.data.cache import MANIFEST, FeatureCache, read_manifest
from vqkit.data.dataset import SegmentDataset
from vqkit.nn.model import build_model
from vqkit.tools.export import export_modules, torchscript_modules
from vqkit.tools.generate import code_frequencies, draw_codes, interpolate
from vqkit.tools.inputs import load_spectrogram_model, open_cache, parse_cache_ref, read_input
from vqkit.tools.viz import mixture, toy_training

TINY_MODEL = {"hidden": 16, "latent_dim": 8, "n_res_blocks": 1}
BOTTLENECKS = {
    "vq": {"kind": "vq", "codebook_size": 16, "kmeans_init": False},
    "rvq": {"kind": "rvq", "n_codebooks": 3, "codebook_size": 16, "kmeans_init": False},
    "fsq": {"kind": "fsq", "fsq_levels": [5, 4, 3]},
    "vae": {"kind": "gaussian"},
    "ae": {"kind": "identity"},
}
HAVE_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime"))


def make_run(root: Path, config: Config, stats: dict, model: str = "conv1d", **bottleneck) -> Path:
    """A run folder holding a random-weight model of ``bottleneck`` and the cache's statistics."""
    config = replace(
        config, model={**TINY_MODEL, "kind": model}, bottleneck=bottleneck, codec={"gl_iters": 4}
    )
    n_bins = len(stats["mean"])
    torch.manual_seed(0)
    net = build_model(config, (n_bins,))
    save_checkpoint(
        root / "checkpoints" / "best.safetensors",
        net,
        config,
        tensors={f"norm.{k}": torch.from_numpy(v) for k, v in stats.items()},
        meta={"step": 0, "in_shape": [n_bins]},
    )
    return root


@pytest.fixture(scope="module")
def runs(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One run per bottleneck kind on the tiny cache's features."""
    cache = FeatureCache(tiny_cache)
    root = tmp_path_factory.mktemp("runs")
    return {
        name: make_run(root / name, cache.config, cache.stats, **values)
        for name, values in BOTTLENECKS.items()
    }


def run_cli(argv: list[str]) -> str:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main([str(a) for a in argv]) == 0
    return buffer.getvalue()


def cli_error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    assert main([str(a) for a in argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("vqkit: error: ") and err.count("\n") == 1, err
    return err


# --- vqkit viz vq ------------------------------------------------------------------------------


def test_viz_writes_an_animation_and_its_last_frame(tmp_path):
    printed = run_cli(["viz", "vq", "--out", tmp_path / "vq.gif", "--steps", 4, "--stages", 2])
    with Image.open(tmp_path / "vq.gif") as gif:
        assert gif.format == "GIF" and gif.n_frames == 5  # the start and one frame per step
        size = gif.size
    with Image.open(tmp_path / "vq.png") as png:
        assert png.format == "PNG" and png.size == size
    assert re.search(r"distortion [0-9.]+, [0-9.]+ after 4 steps", printed)


@pytest.mark.parametrize("stages", [1, 2])
def test_viz_codebooks_learn_the_toy_data(stages):
    runs = {u: list(toy_training(stages=stages, steps=60, update=u)) for u in ("ema", "loss")}
    spread = mixture().spread  # the distortion of coding every point by its true centre
    for frames in runs.values():
        first, last = frames[0].distortion, frames[-1].distortion
        assert len(frames) == 61 and len(last) == stages
        assert last[0] < first[0] / 20  # the codes travelled from the origin to the clusters
        assert last[-1] < 2.5 * spread / stages
        assert frames[-1].codes_used[0] >= 7  # dead codes were re-seeded
    assert runs["ema"][20].distortion[-1] < runs["loss"][20].distortion[-1]  # EMA is quicker
    if stages == 2:
        assert runs["ema"][-1].distortion[1] < runs["ema"][-1].distortion[0] / 2


def test_viz_rejects_a_bad_output(tmp_path, capsys):
    assert "must be a .gif" in cli_error(["viz", "vq", "--out", tmp_path / "vq.png"], capsys)


# --- vqkit pager -------------------------------------------------------------------------------


def page_data(page: Path) -> dict:
    text = page.read_text()
    found = re.search(r'<script type="application/json" id="pager-data">(.*?)</script>', text, re.S)
    return json.loads(found.group(1))


@pytest.fixture(scope="module")
def pager(runs, tiny_cache, tmp_path_factory):
    """The page of the tiny cache's row 1 through the residual VQ, with its data and row."""
    page = tmp_path_factory.mktemp("pager") / "pager.html"
    printed = run_cli(["pager", f"{tiny_cache}#1", "--model", runs["rvq"], "--out", page])
    row = read_manifest(tiny_cache / MANIFEST)[1]
    return page, page_data(page), row, printed


def test_pager_embeds_the_frames_codes_and_distortion(pager, tiny_cache):
    page, data, row, printed = pager
    x = FeatureCache(tiny_cache).load(row)  # (F, N) dB
    n = row["frames"]
    assert len(data["x"]) == len(data["x_hat"]) == len(data["distortion"]) == n
    assert np.allclose(np.array(data["x"]).T, x, atol=0.051)  # to 0.1 dB
    assert data["n_codebooks"] == 3 and len(data["codes"]) == math.ceil(n / 4)
    assert all(len(stage) == 1 and 0 <= stage[0] < 16 for col in data["codes"] for stage in col)
    error = np.array(data["x"]) - np.array(data["x_hat"])
    per_frame = np.sqrt((error**2).mean(1))
    assert np.allclose(per_frame, data["distortion"], atol=0.1)
    assert data["mean_distortion_db"] == pytest.approx(per_frame.mean(), abs=0.05)
    assert f"{n} frames" in printed
    assert len(data["axis"]) == x.shape[0] and data["axis"][-1] == 4000.0  # Hz at 8 kHz


def test_pager_keeps_fewer_stages_and_continuous_models(runs, tiny_speech_dir, tmp_path):
    audio = sorted(tiny_speech_dir.glob("*/*.wav"))[0]
    run_cli(["pager", audio, "--model", runs["rvq"], "--out", tmp_path / "one.html", "--stages", 1])
    one = page_data(tmp_path / "one.html")
    assert one["n_codebooks"] == 1 and len(one["codes"][0]) == 1
    run_cli(["pager", audio, "--model", runs["vae"], "--out", tmp_path / "vae.html"])
    vae = page_data(tmp_path / "vae.html")
    assert vae["codes"] is None and vae["n_codebooks"] == 0
    assert len(vae["x"]) == 1 + sf.info(str(audio)).frames // 32  # centred frames, hop 32


@needs_chromium
@pytest.mark.parametrize(
    ("fragment", "expected"),
    [
        ("keys=Right,Right,Left", 1),
        ("keys=Left", 0),  # clamped at the start
        ("keys=End,Right", -1),  # clamped at the end
        ("frame=5&keys=PageDown,Up", 10),
    ],
)
def test_pager_keys_move_the_frame_in_chromium(pager, tmp_path, fragment, expected):
    page, data, _, _ = pager
    n = len(data["x"])
    dom, console = dump_dom(page, tmp_path / "profile", fragment)
    assert console == []
    frame = expected % n
    assert f"<title>frame {frame} / {n}</title>" in dom
    assert f'id="where">frame {frame} / {n}<' in dom  # the label the handler rewrote


def test_inputs_name_cache_rows_by_index_or_path(runs, tiny_cache):
    spec = load_spectrogram_model(runs["vq"])
    rows = read_manifest(tiny_cache / MANIFEST)
    by_path = read_input(f"{tiny_cache / MANIFEST}#{rows[2]['path']}", spec)
    by_index = read_input(f"{tiny_cache}#2", spec)
    assert by_path.name == by_index.name == rows[2]["path"]
    assert torch.equal(by_path.x_db, by_index.x_db)
    assert parse_cache_ref(str(tiny_cache / MANIFEST)) is None  # a file, not a reference


def test_pager_errors_are_one_line(runs, tiny_cache, tmp_path, capsys):
    argv = ["--model", runs["rvq"], "--out", tmp_path / "p.html"]
    assert "row 99 does not exist" in cli_error(["pager", f"{tiny_cache}#99", *argv], capsys)
    assert "no row with path 'nobody.wav'" in cli_error(
        ["pager", f"{tiny_cache}#nobody.wav", *argv], capsys
    )
    assert "--stages must be in 1..3" in cli_error(
        ["pager", f"{tiny_cache}#0", *argv, "--stages", 4], capsys
    )
    assert "no such file" in cli_error(["pager", tmp_path / "none.wav", *argv], capsys)


# --- vqkit generate ----------------------------------------------------------------------------


def read_waves(paths: list[Path]) -> list[np.ndarray]:
    waves = []
    for path in paths:
        wave, rate = sf.read(str(path), dtype="float32")
        assert rate == 8000 and np.isfinite(wave).all() and np.abs(wave).max() > 1e-3
        waves.append(wave)
    return waves


def test_generate_samples_a_vq_model_from_its_code_counts(runs, tiny_cache, tmp_path):
    out = tmp_path / "gen"
    argv = ["generate", runs["rvq"], "--n", 3, "--out", out, "--data", tiny_cache]
    run_cli([*argv, "--seconds", 0.5, "--iters", 4])
    waves = read_waves(sorted(out.glob("sample-*.wav")))
    assert len(waves) == 3 and not list(out.glob("interp-*"))
    frames = 1 + 4000 // 32
    assert {len(w) for w in waves} == {(frames - 1) * 32}
    summary = json.loads((out / "generate.json").read_text())
    assert summary["kind"] == "codes" and 0 < summary["code_stats"]["usage/2"] <= 1
    assert (out / "spectrograms.png").stat().st_size > 1000


def test_code_counts_cover_every_training_frame(runs, tiny_cache):
    spec = load_spectrogram_model(runs["rvq"])
    cache = open_cache(tiny_cache, spec)
    counts = code_frequencies(spec, cache, batch_size=2)  # batched by equal length
    expected = torch.zeros_like(counts)
    for item in SegmentDataset(cache, "train", 0, train=False):  # one at a time
        with torch.no_grad():
            codes = spec.model.encode(item[None])[0]  # (Q, N')
        for q, row in enumerate(codes):
            expected[q] += torch.bincount(row, minlength=16)
    assert torch.equal(counts, expected)


def test_drawn_codes_follow_the_counts():
    counts = torch.tensor([[0, 30, 0, 10], [5, 0, 0, 0]])
    codes = draw_codes(counts, 50, (40,), torch.Generator().manual_seed(0))
    assert codes.shape == (50, 2, 40) and codes.dtype == torch.int64
    first = torch.bincount(codes[:, 0].flatten(), minlength=4) / 2000
    assert first[0] == first[2] == 0 and abs(first[1] - 0.75) < 0.03
    assert bool((codes[:, 1] == 0).all())


def test_generate_samples_and_interpolates_a_vae(runs, tiny_cache, tmp_path):
    out = tmp_path / "vae"
    run_cli(["generate", runs["vae"], "--n", 3, "--out", out, "--data", tiny_cache, "--iters", 4])
    assert len(read_waves(sorted(out.glob("sample-*.wav")))) == 3
    assert len(read_waves(sorted(out.glob("interp-*.wav")))) == 3
    summary = json.loads((out / "generate.json").read_text())
    assert summary["kind"] == "vae" and summary["interpolations"][0] == "interp-00.wav"


def test_generate_samples_a_vae_without_data(runs, tmp_path):
    """Samples of a VAE need only the model: no cache, and so no interpolation."""
    out = tmp_path / "vae"
    printed = run_cli(["generate", runs["vae"], "--n", 3, "--out", out, "--iters", 2])
    assert len(read_waves(sorted(out.glob("sample-*.wav")))) == 3
    assert not list(out.glob("interp-*")) and "interpolation" not in printed
    summary = json.loads((out / "generate.json").read_text())
    assert summary["samples"] == ["sample-00.wav", "sample-01.wav", "sample-02.wav"]
    assert summary["interpolations"] == []


def test_interpolation_ends_at_the_two_clips(runs, tiny_cache, tiny_speech_dir):
    spec = load_spectrogram_model(runs["ae"])
    clips = [read_input(f"{tiny_cache}#0", spec), read_input(f"{tiny_cache}#5", spec)]
    x_db = interpolate(spec, clips, 4)
    frames = min(c.x_db.shape[-1] for c in clips)
    assert x_db.shape == (4, 65, frames)
    for clip, end in zip(clips, (x_db[0], x_db[-1]), strict=True):
        x = spec.normaliser.normalise(clip.x_db[None, :, :frames])
        with torch.no_grad():
            recon = spec.normaliser.denormalise(spec.model(x).x_hat, torch.zeros(1, 0))[0]
        assert torch.allclose(end, recon, atol=1e-4)


def test_generated_audio_is_griffin_lim_not_zero_phase(runs, tiny_cache, tmp_path):
    """The seed's generator inverted magnitudes with zero phase; Griffin-Lim's sound has a
    spectrogram much nearer the decoded one."""
    out = tmp_path / "gl"
    sources = [f"{tiny_cache}#0", f"{tiny_cache}#1"]
    run_cli(["generate", runs["vae"], "--n", 1, "--out", out, "--from", *sources, "--iters", 16])
    spec = load_spectrogram_model(runs["vae"])
    clips = [read_input(source, spec) for source in sources]
    target = interpolate(spec, clips, 1)  # (1, F, N) dB, what the WAV was made from
    magnitude = spec.frontend.to_magnitude(target)
    window = torch.hann_window(128)
    zero_phase = torch.istft(magnitude.to(torch.complex64), 128, 32, window=window)
    wave = torch.from_numpy(sf.read(str(out / "interp-00.wav"), dtype="float32")[0])
    frames = target.shape[-1] - 1

    def distance(w: torch.Tensor) -> float:
        return (spec.frontend(w[None])[..., :frames] - target[..., :frames]).abs().mean().item()

    assert distance(wave) < distance(zero_phase[0]) - 1.0


def test_generate_errors_are_one_line(runs, tiny_cache, tmp_path, capsys):
    argv = ["generate", runs["rvq"], "--out", tmp_path]
    assert "needs --data CACHE" in cli_error(argv, capsys)
    assert "needs --data CACHE" in cli_error(["generate", runs["ae"], "--out", tmp_path], capsys)
    assert "--n 1..256" in cli_error([*argv, "--n", 0], capsys)


# --- vqkit export ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BOTTLENECKS))
def test_torchscript_modules_match_the_eager_model(runs, name):
    model = load_checkpoint(runs[name] / "checkpoints" / "best.safetensors").model
    encoder, decoder = torchscript_modules(model)
    for length in (37, 8, 1):  # odd, a multiple of the stride, one frame
        x = torch.randn(3, 65, length, generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            codes, x_hat = model.encode(x), model(x).x_hat
            assert torch.equal(encoder(x), codes)
            assert torch.equal(decoder(codes), model.decode(codes))
            assert torch.equal(decoder(encoder(x))[..., :length], x_hat)


@pytest.mark.parametrize(
    ("kind", "in_shape", "x_shape", "codes_shape"),
    [
        ("conv2d", (65,), (2, 65, 21), (2, 3, 17, 6)),  # a spectrogram as an image, padded
        ("conv2d", (3, 12, 12), (2, 3, 12, 12), (2, 3, 3, 3)),  # colour images
        ("convlist", (1, 14, 10), (2, 1, 14, 10), (2, 3, 4, 3)),
    ],
)
def test_export_handles_2d_models(tiny_config, kind, in_shape, x_shape, codes_shape):
    config = replace(tiny_config, model={**TINY_MODEL, "kind": kind}, bottleneck=BOTTLENECKS["rvq"])
    torch.manual_seed(0)
    model = build_model(config, in_shape).eval()
    eager, _ = export_modules(model)
    encoder, decoder = torchscript_modules(model)
    x = torch.randn(*x_shape)
    with torch.no_grad():
        codes = model.encode(x)
        assert codes.shape == codes_shape and torch.equal(eager(x), codes)
        assert torch.equal(encoder(x), codes)
        assert torch.equal(decoder(codes), model.decode(codes))
        x_hat = decoder(codes)[..., : x_shape[-2], : x_shape[-1]]
        assert torch.equal(x_hat, model(x).x_hat)


def test_export_torchscript_files_through_the_cli(runs, tmp_path):
    printed = run_cli(["export", runs["rvq"], "--out", tmp_path])
    assert "encoder.pt" in printed
    encoder = torch.jit.load(str(tmp_path / "encoder.pt"))
    decoder = torch.jit.load(str(tmp_path / "decoder.pt"))
    model = load_checkpoint(runs["rvq"] / "checkpoints" / "best.safetensors").model
    x = torch.randn(2, 65, 29)
    with torch.no_grad():
        assert torch.equal(encoder(x), model.encode(x))
        assert torch.equal(decoder(encoder(x))[..., :29], model(x).x_hat)
    manifest = json.loads((tmp_path / "export.json").read_text())
    assert manifest["n_codebooks"] == 3 and len(manifest["normaliser"]["mean"]) == 65


@pytest.mark.skipif(not HAVE_ONNX, reason="needs onnx, onnxscript and onnxruntime (pip install)")
def test_export_onnx_matches_the_eager_model(runs, tmp_path):
    import onnxruntime

    run_cli(["export", runs["rvq"], "--format", "onnx", "--out", tmp_path])
    encoder = onnxruntime.InferenceSession(str(tmp_path / "encoder.onnx"))
    decoder = onnxruntime.InferenceSession(str(tmp_path / "decoder.onnx"))
    model = load_checkpoint(runs["rvq"] / "checkpoints" / "best.safetensors").model
    for batch, length in ((1, 37), (3, 12)):  # other sizes than the export's example
        x = torch.randn(batch, 65, length)
        (codes,) = encoder.run(None, {"x": x.numpy()})
        (x_hat,) = decoder.run(None, {"codes": codes})
        with torch.no_grad():
            assert np.array_equal(codes, model.encode(x).numpy())
            expected = model.decode(torch.from_numpy(codes)).numpy()
        assert x_hat.shape == expected.shape and np.allclose(x_hat, expected, atol=1e-5)


def test_export_errors_are_one_line(runs, tmp_path, capsys):
    assert "does not exist" in cli_error(["export", tmp_path / "none", "--out", tmp_path], capsys)
