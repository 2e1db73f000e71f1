"""Fuzz the .vqc reader and the bit-packer for longer than CI does.

Runs the same strategies and checks as tests/test_codefile.py (mutated files, crafted headers with a
correct CRC, random bytes, packer round trips) with many more examples; the only acceptable outcomes
are a correct decode or a VqkitError. Usage::

    .venv/bin/python benchmarks/fuzz_codefile.py [--examples 100000] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from hypothesis import HealthCheck, given, seed, settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_codefile import FUZZ_TARGETS  # noqa: E402


def counting(check: Callable[[object], None], ran: list[int]) -> Callable[[object], None]:
    """``check`` that also counts the examples it is given, to report what really ran."""

    def counted(data: object) -> None:
        ran.append(1)
        check(data)

    return counted


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=100_000, help="examples per target")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed")
    args = parser.parse_args(argv)
    total = 0
    for name, (strategy, check, _) in FUZZ_TARGETS.items():
        start, ran = time.perf_counter(), []
        run = settings(
            max_examples=args.examples,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )(seed(args.seed)(given(strategy)(counting(check, ran))))
        run()
        total += len(ran)
        print(f"{name}: {len(ran)} examples passed in {time.perf_counter() - start:.1f} s")
    print(f"all {len(FUZZ_TARGETS)} targets passed ({total} examples)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
