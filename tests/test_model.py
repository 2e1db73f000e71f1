"""Encoders, decoders and the Autoencoder: shapes (odd sizes too), exact decoding, learning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vqkit.config import Config, replace
from vqkit.errors import VqkitError
from vqkit.nn.blocks import conv, conv_transpose, exact_padding, pad_to_multiple
from vqkit.nn.model import Autoencoder, build_model

ENCODERS = ["conv1d", "conv2d", "convlist"]
BOTTLENECKS = ["identity", "gaussian", "vq", "rvq", "fsq"]
TINY = {"hidden": 16, "latent_dim": 8, "n_res_blocks": 1, "filters": [8, 16]}


def tiny_config(
    kind: str, family: str, model: dict | None = None, bottleneck: dict | None = None, **sections
) -> Config:
    """A tiny model of ``kind`` with a bottleneck of ``family``, plus config changes."""
    model = {**TINY, "kind": kind, **(model or {})}
    n = 3 if family == "rvq" else 1
    bottleneck = {"kind": family, "codebook_size": 16, "n_codebooks": n, **(bottleneck or {})}
    return replace(Config(), model=model, bottleneck=bottleneck, **sections)


def inputs(kind: str) -> list[tuple[tuple[int, ...], torch.Tensor]]:
    """(in_shape, x) pairs with odd sizes: spectrograms, and images for the 2-D kinds."""
    cases = [((11,), torch.randn(2, 11, 13)), ((11,), torch.randn(1, 11, 1))]
    if kind != "conv1d":
        cases.append(((3, 9, 7), torch.randn(2, 3, 9, 7)))
    return cases


def length_of(model: Autoencoder, x: torch.Tensor) -> int | tuple[int, ...]:
    return x.shape[-1] if model.dims == 1 else tuple(x.shape[-2:])


@pytest.mark.parametrize("bottleneck", BOTTLENECKS)
@pytest.mark.parametrize("kind", ENCODERS)
def test_shapes_for_every_encoder_and_bottleneck(kind: str, bottleneck: str) -> None:
    torch.manual_seed(0)
    for in_shape, x in inputs(kind):
        model = build_model(tiny_config(kind, bottleneck), in_shape).train()
        out = model(x)
        assert out.x_hat.shape == x.shape
        latent = model.latent_shape(length_of(model, x))
        assert out.z.shape == (x.shape[0], *latent)
        assert out.bottleneck.z_q.shape == out.z.shape
        if model.bottleneck.discrete:
            q = model.bottleneck.n_codebooks
            assert out.bottleneck.codes.shape == (x.shape[0], q, *latent[1:])


@pytest.mark.parametrize("bottleneck", BOTTLENECKS)
@pytest.mark.parametrize("kind", ENCODERS)
def test_decoding_the_codes_equals_the_forward_output(kind: str, bottleneck: str) -> None:
    torch.manual_seed(1)
    for in_shape, x in inputs(kind):
        model = build_model(tiny_config(kind, bottleneck), in_shape)
        model.train()(x)  # k-means initialisation, batch-norm statistics
        model.eval()
        for n in range(1, 4) if bottleneck == "rvq" else [None]:
            expected = model(x, n).x_hat
            assert torch.equal(model.decode(model.encode(x, n), length_of(model, x)), expected)
        if kind != "conv1d" and len(in_shape) == 1:  # a spectrogram's height is known
            assert torch.equal(model.decode(model.encode(x), x.shape[-1]), expected)


def test_downsample_sets_the_code_rate() -> None:
    for downsample, frames in [(1, 13), (2, 7), (4, 4), (8, 2)]:
        config = tiny_config("conv1d", "vq", model={"downsample": downsample})
        model = build_model(config, (5,))
        assert model.downsample == downsample
        assert model.encode(torch.randn(1, 5, 13)).shape == (1, 1, frames)
    image_model = build_model(tiny_config("conv2d", "fsq"), (1, 28, 28))
    assert image_model.encode(torch.randn(2, 1, 28, 28)).shape == (2, 1, 7, 7)
    assert image_model.latent_shape(28) == image_model.latent_shape((28, 28)) == (8, 7, 7)
    spectrogram_model = build_model(tiny_config("conv2d", "vq"), (80,))
    assert spectrogram_model.latent_shape(13) == (8, 20, 4)  # F = 80 bins, 13 frames


@pytest.mark.parametrize("ema", [False, True])
def test_gradients_reach_encoder_decoder_and_every_codebook(ema: bool) -> None:
    torch.manual_seed(2)
    config = tiny_config("conv1d", "rvq", bottleneck={"ema": ema, "codebook_dim": 4})
    model = build_model(config, (6,)).train()
    stages = model.bottleneck.stages
    before = [s.codebook.vectors.detach().clone() for s in stages]
    x = torch.randn(4, 6, 64)  # more latent vectors than codes, so k-means cannot fit them all
    out = model(x)
    (F.mse_loss(out.x_hat, x) + out.bottleneck.loss).backward()
    for part in (model.encoder, model.decoder):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    for stage, old in zip(stages, before, strict=True):
        if ema:
            assert not torch.equal(stage.codebook.vectors, old)
        else:
            assert stage.codebook.vectors.grad.abs().sum() > 0


@pytest.mark.parametrize("bottleneck", ["vq", "gaussian"])
def test_a_tiny_model_overfits_one_batch(bottleneck: str) -> None:
    torch.manual_seed(3)
    config = tiny_config(
        "conv1d",
        bottleneck,
        model={"hidden": 32, "latent_dim": 16},
        bottleneck={"codebook_size": 64, "kl_weight": 1e-3},
    )
    model = build_model(config, (8,)).train()
    x = torch.randn(4, 8, 8).repeat_interleave(4, dim=2)  # smooth in time, so codes can capture it
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        out = model(x)
        loss = F.mse_loss(out.x_hat, x) + out.bottleneck.loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(F.mse_loss(out.x_hat, x).item())
    assert losses[-1] < 0.1 * losses[0]


def test_dense_convlist_needs_and_checks_a_fixed_size() -> None:
    torch.manual_seed(4)
    config = tiny_config(
        "convlist", "gaussian", model={"dense_dim": 6}, train={"segment_frames": 13}
    )
    model = build_model(config, (10,)).eval()
    x = torch.randn(3, 10, 13)
    out = model(x)
    assert out.x_hat.shape == x.shape and out.z.shape == (3, 6, 1, 1)
    assert model.downsample == 16  # 13 frames padded to 16, one latent vector
    assert torch.equal(model.decode(model.encode(x)), out.x_hat)
    with pytest.raises(ValueError, match=r"fixed size \(10, 13\), got \(10, 15\)"):
        model(torch.randn(3, 10, 15))
    image = build_model(replace(config, model={"dense_dim": 4}), (1, 9, 9))
    assert image(torch.randn(2, 1, 9, 9)).x_hat.shape == (2, 1, 9, 9)
    with pytest.raises(VqkitError, match="segment_frames"):
        build_model(replace(config, train={"segment_frames": 0}), (10,))


def test_vae_samples_decode_to_the_input_shape() -> None:
    torch.manual_seed(5)
    model = build_model(tiny_config("conv1d", "gaussian"), (6,)).eval()
    z = model.sample_latent((2, *model.latent_shape(13)))
    assert z.shape == (2, 8, 4)
    assert model.decode(z, 13).shape == (2, 6, 13)
    generator = torch.Generator().manual_seed(0)
    a = model.sample_latent((1, 8, 4), generator)
    assert torch.equal(a, model.sample_latent((1, 8, 4), torch.Generator().manual_seed(0)))
    vq = build_model(tiny_config("conv1d", "vq"), (6,))
    with pytest.raises(VqkitError, match="sampling needs a VAE"):
        vq.sample_latent((1, 8, 4))


def test_config_errors_are_clear() -> None:
    with pytest.raises(VqkitError, match="power of 2, got 3"):
        build_model(tiny_config("conv1d", "vq", model={"downsample": 3}), (6,))
    with pytest.raises(VqkitError, match="conv1d' needs spectrograms"):
        build_model(tiny_config("conv1d", "vq"), (1, 8, 8))
    with pytest.raises(VqkitError, match="one length"):
        build_model(tiny_config("convlist", "vq", model={"kernels": [3]}), (6,))
    with pytest.raises(VqkitError, match="odd kernel"):
        bad = {"filters": [8], "kernels": [4], "strides": [1]}
        build_model(tiny_config("convlist", "vq", model=bad), (6,))
    # an enumerated value fails when the config loads, naming the valid ones
    with pytest.raises(VqkitError, match="model.kind must be one of conv1d, conv2d, convlist"):
        build_model(tiny_config("conv3d", "vq"), (6,))


def test_input_shape_errors_say_expected_and_actual() -> None:
    model = build_model(tiny_config("conv1d", "vq"), (6,))
    with pytest.raises(ValueError, match=r"expected x of shape \(B, 6, N\), got \(2, 5, 9\)"):
        model(torch.randn(2, 5, 9))
    image_model = build_model(tiny_config("conv2d", "vq"), (3, 8, 8))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        image_model.encode(torch.randn(2, 8, 8))


@pytest.mark.parametrize("stride", [1, 2, 3, 4])
@pytest.mark.parametrize("kernel", [1, 2, 3, 4, 5, 7])
def test_exact_padding_keeps_lengths(kernel: int, stride: int) -> None:
    if stride == 1 and kernel % 2 == 0:
        with pytest.raises(VqkitError):
            exact_padding(kernel, stride)
        return
    padding, output_padding = exact_padding(kernel, stride)
    down = conv(1, 1, 1, kernel, stride=stride, padding=padding)
    up = conv_transpose(1, 1, 1, kernel, stride, padding, output_padding)
    x = pad_to_multiple(torch.randn(1, 1, 11), stride, 1)
    assert down(x).shape[-1] == x.shape[-1] // stride
    assert up(down(x)).shape == x.shape
