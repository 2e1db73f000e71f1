"""Bottlenecks: shapes, exact code round trips, gradient flow, codebook learning and DDP sync."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from vqkit.config import BottleneckConfig
from vqkit.errors import VqkitError
from vqkit.nn import codebook as codebook_module
from vqkit.nn.bottleneck import (
    FSQ,
    Gaussian,
    Identity,
    ResidualVQ,
    VectorQuantizer,
    build_bottleneck,
    gaussian_kl,
)
from vqkit.nn.codebook import kmeans, nearest

KINDS = ["identity", "gaussian", "vq", "rvq", "fsq"]
SHAPES = [(3, 16, 7), (2, 16, 5, 3)]  # (B, D, N) and (B, D, H, W), odd sizes


def make(kind: str, **changes) -> torch.nn.Module:
    values = {"kind": kind, "codebook_size": 32, "n_codebooks": 3 if kind == "rvq" else 1}
    return build_bottleneck(BottleneckConfig(**{**values, **changes}), latent_dim=16)


def clusters(n_per: int, centres: torch.Tensor, spread: float = 0.01) -> torch.Tensor:
    """``n_per`` noisy copies of each row of ``centres``: ``(n_per * K, d)``."""
    return centres.repeat(n_per, 1) + spread * torch.randn(n_per * len(centres), centres.shape[1])


def test_build_gives_each_family_its_attributes() -> None:
    expected = {  # kind: (class, discrete, n_codebooks, codebook_size)
        "identity": (Identity, False, 0, 0),
        "gaussian": (Gaussian, False, 0, 0),
        "vq": (VectorQuantizer, True, 1, 32),
        "rvq": (ResidualVQ, True, 3, 32),
        "fsq": (FSQ, True, 1, 8 * 5 * 5 * 5),
    }
    for kind, (cls, discrete, n, size) in expected.items():
        bottleneck = make(kind)
        assert type(bottleneck) is cls and bottleneck.discrete == discrete
        assert (bottleneck.n_codebooks, bottleneck.codebook_size) == (n, size)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
def test_shapes_and_types(kind: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    bottleneck = make(kind)
    z = torch.randn(shape)
    out = bottleneck(z)
    assert out.z_q.shape == z.shape
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert all(isinstance(v, float) for v in out.stats.values())
    if bottleneck.discrete:
        q = bottleneck.n_codebooks
        assert out.codes.shape == (shape[0], q, *shape[2:]) and out.codes.dtype == torch.int64
        assert out.codes.min() >= 0 and out.codes.max() < bottleneck.codebook_size
        assert {f"perplexity/{i}" for i in range(q)} <= out.stats.keys()
    else:
        assert out.codes is None and bottleneck.codebook_size == 0


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
def test_eval_round_trip_is_exact(kind: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(1)
    bottleneck = make(kind, codebook_dim=4 if kind in ("vq", "rvq") else 0)
    z = torch.randn(shape)
    bottleneck.train()(z)  # k-means initialisation and one update
    bottleneck.eval()
    stages = range(1, bottleneck.n_codebooks + 1) if kind == "rvq" else [None]
    for n in stages:
        out = bottleneck(z, n)
        codes = bottleneck.quantize(z, n)
        if bottleneck.discrete:
            assert torch.equal(codes, out.codes)
        assert torch.equal(bottleneck.dequantize(codes), out.z_q)


@pytest.mark.parametrize("ema", [False, True])
@pytest.mark.parametrize("kind", ["vq", "rvq"])
def test_gradients_reach_encoder_and_every_codebook(kind: str, ema: bool) -> None:
    torch.manual_seed(2)
    bottleneck = make(kind, ema=ema, codebook_dim=8).train()
    stages = bottleneck.stages if kind == "rvq" else [bottleneck]
    before = [s.codebook.vectors.detach().clone() for s in stages]
    z = torch.randn(4, 16, 9, requires_grad=True)
    out = bottleneck(z)
    (out.z_q.pow(2).mean() + out.loss).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    for stage, old in zip(stages, before, strict=True):
        assert stage.project_in.weight.grad.abs().sum() > 0
        assert stage.project_out.weight.grad.abs().sum() > 0
        if ema:  # learns by EMA (and k-means): its buffer moves, it gets no gradient
            assert not stage.codebook.vectors.requires_grad
            assert not torch.equal(stage.codebook.vectors, old)
        else:
            assert stage.codebook.vectors.grad.abs().sum() > 0


def test_straight_through_passes_decoder_gradient_unchanged() -> None:
    torch.manual_seed(3)
    vq = make("vq", kmeans_init=False).train()
    z = torch.randn(2, 16, 5, requires_grad=True)
    upstream = torch.randn(2, 16, 5)
    (vq(z).z_q * upstream).sum().backward()
    assert torch.allclose(z.grad, upstream)


def test_kl_is_zero_for_a_standard_normal_posterior() -> None:
    assert gaussian_kl(torch.zeros(4, 8), torch.zeros(4, 8)).item() == 0.0
    assert gaussian_kl(torch.ones(4, 8), torch.zeros(4, 8)).item() == pytest.approx(0.5)
    vae = Gaussian(8, kl_weight=0.5)
    for layer in (vae.mean, vae.logvar):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    out = vae.eval()(torch.randn(2, 8, 5))
    assert out.stats["kl"] == 0.0 and out.loss.item() == 0.0
    assert torch.equal(out.z_q, torch.zeros(2, 8, 5))


def test_gaussian_samples_in_training_and_gives_the_mean_in_eval() -> None:
    torch.manual_seed(4)
    vae, z = Gaussian(8, kl_weight=2.0), torch.randn(2, 8, 5)
    a, b = vae.train()(z), vae(z)
    assert not torch.equal(a.z_q, b.z_q)
    assert a.loss.item() == pytest.approx(2.0 * a.stats["kl"], rel=1e-5)
    mean = vae.eval()(z).z_q
    assert torch.equal(mean, vae(z).z_q) and torch.equal(mean, vae.quantize(z))


def test_nearest_matches_brute_force_also_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(5)
    x, codebook = torch.randn(1000, 8), torch.randn(64, 8)
    expected = torch.cdist(x, codebook).argmin(1)
    assert torch.equal(nearest(x, codebook), expected)
    monkeypatch.setattr(codebook_module, "SEARCH_CHUNK", 7)
    assert torch.equal(nearest(x, codebook), expected)


def test_kmeans_initialisation_finds_the_clusters() -> None:
    torch.manual_seed(6)
    centres = 5 * torch.eye(4, 16)
    vq = make("vq", codebook_size=4).train()
    z = clusters(50, centres).T.reshape(1, 16, 200)
    vq(z)
    vectors = vq.codebook.vectors
    assert bool(vq.codebook.initialised)
    assert torch.cdist(centres, vectors).min(1).values.max() < 0.1
    assert sorted(vq.eval()(z).codes.unique().tolist()) == [0, 1, 2, 3]


@pytest.mark.parametrize("ema", [False, True])
def test_dead_codes_are_reseeded_from_encoder_outputs(ema: bool) -> None:
    torch.manual_seed(7)
    vq = make("vq", codebook_size=8, kmeans_init=False, ema=ema, dead_window=1).train()
    with torch.no_grad():
        vq.codebook.vectors[:] = 100.0  # far from every input: all but one code is never used
        vq.codebook.vectors[0] = 0.0
    z = torch.randn(2, 16, 50)
    vq(z)
    rows = z.movedim(1, -1).reshape(-1, 16)
    vectors = vq.codebook.vectors.detach()
    distance = (vectors[:, None] - rows[None]).abs().amax(2).amin(1)
    assert distance[1:].max() == 0  # every dead code is now one of the batch's vectors
    assert vq.codebook.usage.sum() == 0 and vq.codebook.steps == 0  # a new window started
    assert vq.eval()(z).stats["usage/0"] > 0.5


def test_ema_moves_codes_to_the_mean_of_their_vectors() -> None:
    torch.manual_seed(8)
    centres = 3 * torch.eye(2, 16)
    vq = make("vq", codebook_size=2, decay=0.5, dead_window=0).train()
    z = clusters(100, centres, spread=0.3).T.reshape(1, 16, 200)
    for _ in range(20):
        vq(z)
    codes = vq.eval().quantize(z).flatten()
    rows = z[0].T
    means = torch.stack([rows[codes == k].mean(0) for k in range(2)])
    assert torch.allclose(vq.codebook.vectors, means, atol=1e-3)


def test_quantizer_dropout_yields_several_stage_counts() -> None:
    torch.manual_seed(9)
    rvq = make("rvq", n_codebooks=4, quantizer_dropout=1.0).train()
    z = torch.randn(2, 16, 6)
    counts = {rvq(z).codes.shape[1] for _ in range(40)}
    assert len(counts) >= 3 and counts <= {1, 2, 3, 4}
    assert rvq(z, n_codebooks=2).codes.shape[1] == 2  # an explicit count is never dropped
    assert {rvq.eval()(z).codes.shape[1] for _ in range(5)} == {4}


def test_more_residual_stages_reconstruct_better() -> None:
    torch.manual_seed(10)
    rvq = make("rvq", n_codebooks=4, codebook_size=16).train()
    z = torch.randn(4, 16, 64)
    for _ in range(3):
        rvq(z)
    errors = [F.mse_loss(rvq.eval()(z, n).z_q, z).item() for n in range(1, 5)]
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False))


def test_beam_search_codes_closer_and_exactly_when_it_keeps_every_path() -> None:
    """One path is the greedy search of training; more find closer sums of the same codebooks;
    a beam as wide as every pair of the first two stages finds the best of all combinations."""
    torch.manual_seed(13)
    rvq = make("rvq", n_codebooks=3, codebook_size=8).train()
    z = torch.randn(2, 16, 40)
    for _ in range(3):
        rvq(z)
    rvq.eval()

    def error(codes: torch.Tensor) -> torch.Tensor:  # squared distance per latent vector
        return (rvq.dequantize(codes) - z).square().sum(1).flatten()

    greedy = rvq.quantize(z)
    assert torch.equal(rvq.quantize(z, beam=1), greedy) and torch.equal(rvq(z).codes, greedy)
    assert error(rvq.quantize(z, beam=4)).mean() < error(greedy).mean()
    every = torch.cartesian_prod(*[torch.arange(8)] * 3).T[None]  # (1, 3, 512)
    sums = rvq.dequantize(every)[0].T  # (512, 16)
    best = torch.cdist(z.movedim(1, -1).reshape(-1, 16), sums).square().min(1).values
    torch.testing.assert_close(error(rvq.quantize(z, beam=64)), best, atol=1e-4, rtol=1e-4)
    image = torch.randn(2, 16, 3, 5)
    assert rvq.quantize(image, 2, beam=3).shape == (2, 2, 3, 5)
    with pytest.raises(ValueError, match="beam"):
        rvq.quantize(z, beam=0)


def test_fsq_codes_are_in_range_and_decode_to_the_grid() -> None:
    torch.manual_seed(11)
    levels = (8, 5, 3)
    fsq = FSQ(3, levels)
    assert fsq.codebook_size == 120 and not list(fsq.parameters())
    z = 4 * torch.randn(4, 3, 200)
    out = fsq(z)
    assert out.codes.min() >= 0 and out.codes.max() < 120
    assert out.stats["usage/0"] > 0.5
    for i, level in enumerate(levels):  # each channel takes exactly its levels' values
        values = out.z_q[:, i].unique() * (level // 2)
        assert len(values) == level and torch.equal(values, values.round())
    grid = fsq.dequantize(torch.arange(120).reshape(1, 1, 120))[0].T  # every code once
    assert len(grid.unique(dim=0)) == 120 and grid.abs().max() == 1.0


def test_fsq_rejects_bad_levels() -> None:
    with pytest.raises(VqkitError, match="fsq_levels"):
        make("fsq", fsq_levels=(8, 1))


def test_low_dimensional_l2_normalised_lookup() -> None:
    torch.manual_seed(12)
    vq = make("rvq", n_codebooks=2, codebook_dim=4, l2_normalize=True).train()
    z = torch.randn(4, 16, 32)
    for _ in range(3):
        vq(z)
    for stage in vq.stages:
        vectors = stage.codebook.vectors
        assert vectors.shape == (32, 4)
        assert torch.allclose(vectors.norm(dim=1), torch.ones(32), atol=1e-5)
        assert stage.project_in.weight.shape == (4, 16)
    out = vq.eval()(z)
    assert out.z_q.shape == z.shape
    assert torch.equal(vq.dequantize(vq.quantize(z)), out.z_q)


def test_state_dict_restores_the_codebooks() -> None:
    torch.manual_seed(13)
    a, b = make("rvq").train(), make("rvq")
    z = torch.randn(2, 16, 20)
    a(z)
    b.load_state_dict(a.state_dict())
    assert all(bool(s.codebook.initialised) for s in b.stages)
    assert torch.equal(a.eval().quantize(z), b.eval().quantize(z))


def test_errors_say_what_is_wrong() -> None:
    with pytest.raises(VqkitError, match="unknown bottleneck.kind 'vqq'"):
        make("vqq")
    with pytest.raises(VqkitError, match="use kind 'rvq'"):
        make("vq", n_codebooks=2)
    with pytest.raises(VqkitError, match="decay"):
        make("rvq", decay=1.0)
    vq = make("rvq")
    with pytest.raises(ValueError, match=r"expected z of shape \(B, 16, ...\), got \(2, 8, 5\)"):
        vq(torch.randn(2, 8, 5))
    with pytest.raises(ValueError, match="n_codebooks must be in 1..3, got 4"):
        vq.quantize(torch.randn(2, 16, 5), 4)
    with pytest.raises(ValueError, match="integer codes"):
        vq.dequantize(torch.zeros(2, 4, 5, dtype=torch.long))


def test_kmeans_keeps_empty_clusters_and_needs_no_more_rows_than_codes() -> None:
    torch.manual_seed(14)
    x = torch.randn(5, 3)
    centroids = kmeans(x, 8, iters=3)
    assert centroids.shape == (8, 3) and torch.isfinite(centroids).all()


# -- two processes (gloo): EMA, k-means and re-seeding keep replicas identical ---------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, port: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)  # same initial weights on both ranks
        rvq = make("rvq", codebook_dim=8, dead_window=2, quantizer_dropout=0.5).train()
        torch.manual_seed(100 + rank)  # different data and random draws on each rank
        for _ in range(4):
            rvq(torch.randn(2, 16, 30) + rank)
        results = {"state": rvq.state_dict()}
        # EMA on two ranks equals EMA on the union of their batches in one process
        torch.manual_seed(1)
        vq = make("vq", kmeans_init=False, dead_window=0, decay=0.5).train()
        z = torch.randn(2, 2, 16, 10)
        vq(z[rank])
        results["ema"] = vq.codebook.vectors
        torch.save(results, f"{folder}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_keep_identical_codebooks(tmp_path) -> None:
    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    assert ranks[0]["state"].keys() == ranks[1]["state"].keys()
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
    torch.manual_seed(1)
    single = make("vq", kmeans_init=False, dead_window=0, decay=0.5).train()
    z = torch.randn(2, 2, 16, 10)
    single(torch.cat([z[0], z[1]], dim=0))
    assert torch.equal(ranks[0]["ema"], ranks[1]["ema"])
    assert torch.allclose(ranks[0]["ema"], single.codebook.vectors, atol=1e-6)
