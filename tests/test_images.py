"""Image layouts (CIFAR-10 batches, idx files, image folders, scikit-learn digits), the restricted
unpickler, image caches, and ``vqkit evaluate`` end to end on images and on speech features."""

from __future__ import annotations

import gzip
import json
import math
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vqkit.cli import main
from vqkit.config import load_config
from vqkit.data.cache import FeatureCache
from vqkit.data.corpora import detect_layout
from vqkit.data.dataset import SegmentDataset
from vqkit.data.images import read_cifar_batch, read_idx
from vqkit.data.prepare import prepare
from vqkit.errors import VqkitError
from vqkit.eval.evaluate import evaluate_run
from vqkit.eval.plots import mosaic
from vqkit.train.loop import train
from vqkit.train.validate import image_errors

RECIPES = Path(__file__).resolve().parents[1] / "configs"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY_IMAGE_MODEL = [
    "model.hidden=16",
    "model.latent_dim=8",
    "model.n_res_blocks=1",
    "bottleneck.codebook_size=16",
    "train.batch_size=8",
    "train.steps=4",
    "train.warmup_steps=1",
    "train.lr=0.003",
    "train.log_every=1",
    "train.eval_every=2",
    "train.eval_batches=2",
    "train.device='cpu'",
    "train.threads=1",
]


class Python2Pickler(pickle._Pickler):
    """Writes pickles as CIFAR-10's were written by Python 2's cPickle (protocol 2): bytes as
    Python 2 strings (SHORT_BINSTRING / BINSTRING), numpy's reconstructor as
    ``numpy.core.multiarray._reconstruct``."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_python2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_python2_str

    def save_global(self, obj: object, name: str | None = None) -> None:
        if getattr(obj, "__name__", None) == "_reconstruct":
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def write_cifar_batch(path: Path, images: np.ndarray, labels: list[int]) -> None:
    """A CIFAR-10 python batch: rows of 3072 bytes, the red, green and blue planes in turn."""
    batch = {
        b"batch_label": b"training batch 1 of 5",
        b"labels": labels,
        b"data": images.reshape(len(images), -1),
        b"filenames": [f"image_{i}.png".encode() for i in range(len(images))],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        Python2Pickler(f, protocol=2).dump(batch)


def write_idx(path: Path, array: np.ndarray) -> None:
    """An idx file (uint8), gzipped when the name ends in ``.gz``."""
    head = b"\0\0\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = head + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def random_images(n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def cache_images(cache: Path, split: str) -> dict[str, np.ndarray]:
    features = FeatureCache(cache)
    return {row["path"]: features.load(row) for row in features.items(split)}


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    folder = root / "cifar-10-batches-py"
    write_cifar_batch(folder / "data_batch_1", random_images(20, (3, 32, 32), 1), [1, 2] * 10)
    write_cifar_batch(folder / "test_batch", random_images(6, (3, 32, 32), 2), [3] * 6)
    return root


def test_cifar_batches_read_in_their_standard_layout(cifar_dir: Path, tmp_path: Path) -> None:
    path = cifar_dir / "cifar-10-batches-py" / "data_batch_1"
    raw = path.read_bytes()
    assert raw[:2] == b"\x80\x02" and b"cnumpy.core.multiarray\n_reconstruct\n" in raw
    assert b"U\x04data" in raw  # Python 2 strings, as in the real batches
    images, labels = read_cifar_batch(path)
    expected = random_images(20, (3, 32, 32), 1)
    assert images.shape == (20, 3, 32, 32) and np.array_equal(images, expected)
    assert labels == [1, 2] * 10

    assert detect_layout(cifar_dir) == "cifar10"
    config = load_config(RECIPES / "image_vqvae.toml", ["data.val_fraction=0.25"])
    summary = prepare(cifar_dir, tmp_path / "cache", config, progress=False)
    assert (summary.layout, summary.n_ok, summary.splits["test"]) == ("cifar10", 26, 6)
    assert summary.splits["val"] > 0 and "prepared 26 images" in summary.describe()
    cache = FeatureCache(tmp_path / "cache")
    assert cache.config.features.kind == "image" and cache.config.features.normalise == "none"
    test = cache_images(tmp_path / "cache", "test")
    expected_test = random_images(6, (3, 32, 32), 2)
    for i, (name, x) in enumerate(sorted(test.items())):
        assert name == f"test_batch/{i:05d}"
        assert x.dtype == np.float32 and np.array_equal(x, expected_test[i] / np.float32(255) - 0.5)
    dataset = SegmentDataset(cache, "train", segment_frames=128)  # images are used whole
    assert dataset[0].shape == (3, 32, 32) and -0.5 <= dataset[0].min() <= dataset[0].max() <= 0.5
    assert [row["label"] for row in cache.items("test")] == ["3"] * 6


@pytest.mark.parametrize("payload", ["os.system", "builtins.eval", "numpy.load"])
def test_restricted_unpickler_refuses_code(payload: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    module, name = payload.rsplit(".", 1)
    command = f"touch {marker}" if name == "system" else f"open({str(marker)!r}, 'w')"

    class Evil:
        def __reduce__(self) -> tuple:
            return getattr(__import__(module), name), (command,)

    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(pickle.dumps({"data": Evil()}, protocol=2))
    with pytest.raises(
        VqkitError, match=r"data_batch_1: refusing to unpickle [\w.]+\.(system|eval|load)"
    ):
        read_cifar_batch(folder / "data_batch_1")
    assert not marker.exists()
    if name == "system":  # the CLI says so on one line and exits 1
        assert main(["prepare", str(folder), str(tmp_path / "cache"), "--layout", "cifar10"]) == 1
        assert not marker.exists()


def test_restricted_unpickler_refuses_load_only_globals(tmp_path: Path) -> None:
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8)}, protocol=5))
    with pytest.raises(
        VqkitError, match=r"refusing to unpickle numpy\._core\.numeric\._frombuffer"
    ):
        read_cifar_batch(path)  # protocol 5 arrays need another global: not a CIFAR-10 batch
    write_cifar_batch(path, random_images(2, (3, 32, 32), 0), [0, 1])
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(VqkitError, match="is not a CIFAR-10 python batch"):
        read_cifar_batch(path)
    write_cifar_batch(path, random_images(2, (3, 32, 32), 0)[:, :, :16], [0, 1])
    with pytest.raises(VqkitError, match=r"'data' of uint8 \(n, 3072\)"):
        read_cifar_batch(path)


def test_idx_files_gzipped_and_plain(tmp_path: Path) -> None:
    root = tmp_path / "fashion"
    root.mkdir()
    train_images, test_images = random_images(30, (28, 28), 3), random_images(7, (28, 28), 4)
    train_labels, test_labels = np.arange(30) % 10, np.arange(7) % 10
    write_idx(root / "train-images-idx3-ubyte.gz", train_images)
    write_idx(root / "train-labels-idx1-ubyte.gz", train_labels)
    write_idx(root / "t10k-images-idx3-ubyte", test_images)
    write_idx(root / "t10k-labels-idx1-ubyte", test_labels)
    assert np.array_equal(read_idx(root / "train-images-idx3-ubyte.gz"), train_images)
    assert np.array_equal(read_idx(root / "t10k-labels-idx1-ubyte"), test_labels)
    assert detect_layout(root) == "mnist-idx"

    summary = prepare(root, tmp_path / "cache", load_config(), progress=False)
    assert summary.layout == "mnist-idx" and summary.splits["test"] == 7
    assert summary.splits["train"] + summary.splits.get("val", 0) == 30
    test = cache_images(tmp_path / "cache", "test")
    assert [name.split("/")[0] for name in test] == ["t10k-images-idx3-ubyte"] * 7
    stacked = np.stack([test[name] for name in sorted(test)])
    assert np.array_equal(stacked, test_images[:, None] / np.float32(255) - 0.5)
    labels = [row["label"] for row in FeatureCache(tmp_path / "cache").items("test")]
    assert labels == [str(v) for v in test_labels]
    again = prepare(root, tmp_path / "cache", load_config(), progress=False)  # a rerun
    assert again.splits == summary.splits

    (root / "t10k-images-idx3-ubyte").write_bytes(b"\0\0\x08\x03" + struct.pack(">3I", 9, 28, 28))
    with pytest.raises(VqkitError, match=r"header promises uint8 \(9, 28, 28\) but it holds 0"):
        read_idx(root / "t10k-images-idx3-ubyte")
    (root / "t10k-images-idx3-ubyte").write_bytes(b"PK\x03\x04junk")
    with pytest.raises(VqkitError, match="not an idx file"):
        read_idx(root / "t10k-images-idx3-ubyte")
    (root / "broken-idx3-ubyte.gz").write_bytes(b"\x1f\x8b not gzip")
    with pytest.raises(VqkitError, match="cannot read it"):
        read_idx(root / "broken-idx3-ubyte.gz")


def test_image_folder_with_split_and_class_folders(tmp_path: Path) -> None:
    root = tmp_path / "pictures"
    grey = random_images(9, (12, 10), 5)
    for i, image in enumerate(grey):
        split, label = ("test" if i < 3 else "train"), ("cat" if i % 2 else "dog")
        (root / split / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / split / label / f"{i}.png")
    Image.fromarray(grey[0][:, :8]).save(root / "train" / "odd.png")  # another size
    (root / "train" / "cat" / "broken.png").write_bytes(b"not a png")
    (root / "train" / ".hidden.png").write_bytes(b"never read")
    assert detect_layout(root) == "image-folder"

    config = load_config(None, ["data.val_fraction=0.0"])
    summary = prepare(root, tmp_path / "cache", config, progress=False)
    assert summary.splits == {"train": 6, "test": 3} and summary.n_failed == 2
    reasons = dict(summary.failed)
    assert "8x12 pixels, unlike most images (10x12)" in reasons["train/odd.png"]
    assert "Pillow cannot read it" in reasons["train/cat/broken.png"]
    cache = FeatureCache(tmp_path / "cache")
    for row in cache.items("test"):
        index = int(Path(row["path"]).stem)
        assert row["label"] == ("cat" if index % 2 else "dog")
        assert np.array_equal(cache.load(row), grey[index][None] / np.float32(255) - 0.5)
    stats = json.loads((tmp_path / "cache" / "stats.json").read_text())
    train_pixels = grey[3:] / 255.0 - 0.5
    assert stats["shape"] == [1, 12, 10] and stats["n_failed"] == 2
    assert stats["mean"] == pytest.approx([train_pixels.mean()])
    assert stats["std"] == pytest.approx([train_pixels.std()])


def test_image_folder_turns_grey_to_rgb_when_any_image_has_colour(tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    root.mkdir()
    ramp = np.linspace(0, 255, 8)
    colour = np.stack(np.broadcast_arrays(ramp[:, None], ramp[None, :], 128), -1).astype(np.uint8)
    Image.fromarray(colour).save(root / "colour.png")
    Image.fromarray(colour).save(root / "colour.jpg", quality=95)
    Image.fromarray(colour[..., 0]).save(root / "grey.png")
    config = load_config(None, ["data.val_fraction=0.0", "data.test_fraction=0.0"])
    summary = prepare(root, tmp_path / "cache", config, progress=False)
    assert summary.n_ok == 3 and summary.splits == {"train": 3}
    images = cache_images(tmp_path / "cache", "train")
    assert np.array_equal(images["colour.png"], colour.transpose(2, 0, 1) / np.float32(255) - 0.5)
    assert images["grey.png"].shape == images["colour.jpg"].shape == (3, 8, 8)
    assert np.array_equal(images["grey.png"][0], images["grey.png"][2])
    assert np.abs(images["colour.jpg"] - images["colour.png"]).mean() < 0.1  # lossy, but close


def test_sklearn_digits_need_no_files(tmp_path: Path) -> None:
    datasets = pytest.importorskip("sklearn.datasets")
    summary = prepare("sklearn-digits", tmp_path / "a", load_config(), progress=False)
    assert summary.layout == "sklearn-digits" and summary.n_ok == 1797
    assert summary.splits["test"] > 100 and summary.splits["val"] > 100
    cache = FeatureCache(tmp_path / "a")
    digits = datasets.load_digits()
    row = cache.items("test")[0]
    index = int(row["path"].split("/")[1])
    assert np.array_equal(cache.load(row)[0], digits.images[index] / 16 - 0.5)  # float16 exact
    assert row["label"] == str(digits.target[index])
    config = load_config(None, ["data.layout='sklearn-digits'"])
    prepare("anything", tmp_path / "b", config, progress=False)
    manifests = [(tmp_path / name / "manifest.jsonl").read_text() for name in ("a", "b")]
    assert manifests[0] == manifests[1]  # the same deterministic split


def test_image_cache_refusals(cifar_dir: Path, tiny_speech_dir: Path, tmp_path: Path) -> None:
    prepare(cifar_dir, tmp_path / "cache", load_config(), progress=False)
    other = load_config(None, ["data.val_fraction=0.3"])
    with pytest.raises(VqkitError, match="prepared with data.val_fraction=0.1, now 0.3"):
        prepare(cifar_dir, tmp_path / "cache", other, progress=False)
    with pytest.raises(VqkitError, match="speaker_disjoint does not apply to images"):
        prepare(cifar_dir, tmp_path / "c2", load_config(None, ["data.speaker_disjoint=true"]))
    with pytest.raises(VqkitError, match="features.kind 'image' needs an image corpus"):
        prepare(tiny_speech_dir, tmp_path / "c3", load_config(RECIPES / "image_vqvae.toml"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(VqkitError, match="no images found in .*empty for layout 'cifar10'"):
        prepare(tmp_path / "empty", tmp_path / "c4", load_config(None, ["data.layout='cifar10'"]))


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An idx corpus of 16x16 'digits' (bars at random places) and its cache: 40 train, 10 test."""
    root = tmp_path_factory.mktemp("digits")
    rng = np.random.default_rng(7)
    images = np.zeros((50, 16, 16), np.uint8)
    for image in images:
        row, col = rng.integers(2, 12, 2)
        image[row : row + 3, :] = 200
        image[:, col : col + 2] = 255
    write_idx(root / "train-images-idx3-ubyte", images[:40])
    write_idx(root / "t10k-images-idx3-ubyte.gz", images[40:])
    out = root / "cache"
    prepare(root, out, load_config(RECIPES / "image_vqvae.toml"), progress=False)
    return out


def test_evaluate_a_trained_image_vqvae_through_the_cli(
    digits_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run, out = tmp_path / "run", tmp_path / "eval"
    sets = [arg for value in TINY_IMAGE_MODEL for arg in ("--set", value)]
    argv = ["train", str(RECIPES / "image_vqvae.toml"), "--data", str(digits_cache)]
    assert main([*argv, "--run", str(run), *sets]) == 0
    assert "psnr_db" in capsys.readouterr().out
    assert main(["evaluate", str(run), "--data", str(digits_cache), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "test (10 images), step" in printed and "PSNR" in printed and "bits/image" in printed

    result = json.loads((out / "metrics.json").read_text())
    m = result["metrics"]
    assert result["split"] == "test" and result["n_items"] == 10 and result["kind"] == "image"
    assert m["latent_positions"] == 16 and m["bits_per_image"] == 16 * math.log2(16)
    assert 0 < m["entropy_bits_per_image"] <= m["bits_per_image"]
    assert 0 < m["usage/0"] <= 1 and 1 <= m["perplexity/0"] <= 16
    assert m["psnr_db"] > 0 and m["mse"] == pytest.approx(10 ** (-m["psnr_db"] / 10), rel=0.5)
    for name in ("grid.png", "loss.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert sorted(result["pictures"]) == ["grid.png", "loss.png"]


@pytest.mark.parametrize("recipe", ["image_vae.toml", "image_ae.toml"])
def test_evaluate_continuous_image_models(recipe: str, digits_cache: Path, tmp_path: Path) -> None:
    config = load_config(RECIPES / recipe, [*TINY_IMAGE_MODEL, "train.steps=2"])
    train(config, data=digits_cache, run=tmp_path / "run")
    result = evaluate_run(tmp_path / "run", digits_cache, tmp_path / "eval", n_grid=3)
    m = result["metrics"]
    assert m["latent_positions"] == 16 and m["latent_dim"] == 8 and "bits_per_image" not in m
    assert math.isfinite(m["psnr_db"]) and not any(k.startswith("usage/") for k in m)
    assert ("kl" in m) == (recipe == "image_vae.toml")
    assert (tmp_path / "eval" / "grid.png").read_bytes()[:8] == PNG_MAGIC


def test_evaluate_refuses_other_features(
    digits_cache: Path, cifar_dir: Path, tiny_cache: Path, tmp_path: Path
) -> None:
    config = load_config(RECIPES / "image_vqvae.toml", [*TINY_IMAGE_MODEL, "train.steps=1"])
    train(config, data=digits_cache, run=tmp_path / "run")
    with pytest.raises(VqkitError, match="trained on other features.*features.kind 'image'"):
        evaluate_run(tmp_path / "run", tiny_cache, tmp_path / "eval")
    prepare(cifar_dir, tmp_path / "rgb", load_config(), progress=False)
    with pytest.raises(VqkitError, match="takes images of 1 channels; .* holds 3"):
        evaluate_run(tmp_path / "run", tmp_path / "rgb", tmp_path / "eval")


def test_evaluate_speech_features(tiny_cache: Path, tmp_path: Path) -> None:
    tiny = ["model.hidden=16", "model.latent_dim=8", "model.n_res_blocks=1", "model.downsample=2"]
    tiny += ["bottleneck.codebook_size=16", "train.segment_frames=16", "train.batch_size=4"]
    tiny += ["train.steps=2", "train.warmup_steps=1", "train.device='cpu'", "train.threads=1"]
    train(load_config(RECIPES / "fsdd_vqvae.toml", tiny), data=tiny_cache, run=tmp_path / "run")
    result = evaluate_run(
        tmp_path / "run" / "checkpoints" / "last.safetensors", tiny_cache, tmp_path
    )
    m = result["metrics"]
    assert m["sd_db"] > 0 and m["feature_lsd_db"] > 0 and 0 < m["usage/0"] <= 1  # stft: LSD too
    assert "psnr_db" not in m and result["n_items"] == len(FeatureCache(tiny_cache).items("test"))
    assert sorted(result["pictures"]) == ["loss.png", "spectrograms.png"]
    assert (tmp_path / "spectrograms.png").read_bytes()[:8] == PNG_MAGIC


def test_image_errors_and_mosaic() -> None:
    x = torch.rand(3, 1, 4, 5) - 0.5
    assert image_errors(x, x) == {"mse": 0.0, "psnr_db": pytest.approx(100.0)}
    noisy = image_errors(x, x + 0.1)
    assert noisy["psnr_db"] >= 20.0 - 1e-4  # clipping can only lower the error
    assert image_errors(x, torch.full_like(x, 9.0)) == image_errors(x, torch.full_like(x, 0.5))
    tiles = mosaic(torch.zeros(5, 3, 4, 6), columns=2)
    assert (
        tiles.shape == (3 * 5 - 1, 2 * 7 - 1, 3) and tiles[0, 0, 0] == 0.5 and tiles[4, 0, 0] == 1
    )
    assert mosaic(torch.zeros(2, 1, 4, 4)).shape == (4, 8 * 5 - 1)


def test_cli_prepare_lists_image_layouts(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    text = capsys.readouterr().out
    assert all(name in text for name in ("cifar10", "mnist-idx", "image-folder", "sklearn-digits"))
