"""Nearest-code search: vqkit against the seed's one-hot matmul and vector-quantize-pytorch.

Every method maps the same ``(M, d)`` vectors to codes and code vectors with the same codebook
(eval mode, no gradient); the script checks that the codes agree and prints the median time of
each, and its ratio to vqkit's, from one run::

    .venv/bin/python benchmarks/bench_vq.py               # 16384 vectors x 512 codes x 64 dims
    .venv/bin/python benchmarks/bench_vq.py --threads 1

vector-quantize-pytorch is optional (``pip install --no-deps vector-quantize-pytorch`` and its
small dependencies); without it its rows are skipped with a message.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from vqkit.nn.bottleneck import VectorQuantizer
from vqkit.nn.codebook import CodebookOptions, nearest

Method = Callable[[], tuple[torch.Tensor, torch.Tensor]]  # () -> (codes (M,), vectors (M, d))


def seed_one_hot(x: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The classic tutorial: full distances, argmin, then a one-hot matrix times the codebook."""
    distances = x.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * x @ codebook.t()
    codes = distances.argmin(1)
    one_hot = F.one_hot(codes, codebook.shape[0]).to(x.dtype)
    return codes, one_hot @ codebook


def median_ms(methods: dict[str, Method], repeats: int) -> dict[str, float]:
    """Median time of each method; the methods take turns, so they share the machine's load."""
    for fn in methods.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def vqkit_methods(x: torch.Tensor, codebook: torch.Tensor) -> dict[str, Method]:
    options = CodebookOptions(kmeans_init=False, dead_window=0)
    module = VectorQuantizer(x.shape[1], codebook.shape[0], options=options).eval()
    module.codebook.vectors.copy_(codebook)
    z = x.t().unsqueeze(0)  # (1, d, M): the module's channel-first layout

    def full_module() -> tuple[torch.Tensor, torch.Tensor]:
        out = module(z)
        return out.codes.flatten(), out.z_q[0].t()

    return {
        "vqkit addmm+argmin+embedding": lambda: (
            c := nearest(x, codebook),
            F.embedding(c, codebook),
        ),
        "torch.cdist+argmin+embedding": lambda: (
            c := torch.cdist(x, codebook).argmin(1),
            F.embedding(c, codebook),
        ),
        "seed one-hot matmul": lambda: seed_one_hot(x, codebook),
        "vqkit VectorQuantizer module": full_module,
    }


def vqp_methods(x: torch.Tensor, codebook: torch.Tensor) -> dict[str, Method]:
    """vector-quantize-pytorch's codebook search and its whole module, or {} when absent."""
    try:
        from vector_quantize_pytorch import VectorQuantize
    except ImportError:
        print("vector-quantize-pytorch is not installed: its rows are skipped")
        return {}
    module = VectorQuantize(dim=x.shape[1], codebook_size=codebook.shape[0]).eval()
    module._codebook.embed.copy_(codebook.unsqueeze(0))
    z = x.unsqueeze(0)  # (1, M, d)

    def search() -> tuple[torch.Tensor, torch.Tensor]:
        vectors, codes, _ = module._codebook(z)
        return codes.flatten(), vectors[0]

    def full_module() -> tuple[torch.Tensor, torch.Tensor]:
        vectors, codes, _ = module(z)
        return codes.flatten(), vectors[0]

    return {
        "vector-quantize-pytorch codebook": search,
        "vector-quantize-pytorch module": full_module,
    }


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=int, default=16384)
    parser.add_argument("--codebook-size", type=int, default=512)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="0 keeps torch's default")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.vectors, args.dim, generator=generator)
    codebook = torch.randn(args.codebook_size, args.dim, generator=generator)
    print(
        f"{args.vectors} vectors x {args.codebook_size} codes x {args.dim} dims, float32, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {cpu_name()}"
    )
    methods = vqkit_methods(x, codebook) | vqp_methods(x, codebook)
    reference = torch.cdist(x.double(), codebook.double()).argmin(1)
    rows = []
    with torch.no_grad():
        times = median_ms(methods, args.repeats)
        for name, fn in methods.items():
            codes, vectors = fn()
            agree = (codes == reference).double().mean().item()
            exact = torch.equal(vectors, codebook[codes])
            rows.append((name, times[name], agree, exact))
    base = rows[0][1]
    print(f"{'method':36s} {'ms':>8s} {'x vqkit':>8s} {'codes = float64':>16s} {'vectors':>8s}")
    for name, ms, agree, exact in rows:
        vectors = "exact" if exact else "rounded"
        print(f"{name:36s} {ms:8.2f} {ms / base:8.2f} {agree:15.4%} {vectors:>8s}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
