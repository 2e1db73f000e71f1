"""Copy validation clips of the training voices out of a feature cache's corpus, for tuning
decoding settings without touching the held-out bench voices.

Takes up to N utterances of 3-8 s per speaker from the cache's ``val`` split (never trained on,
though their voices are), chosen by a seeded shuffle, and copies them to OUT as
``<speaker>_<name>.wav``.
Usage: python scripts/val_clips.py CACHE CORPUS OUT [--per-speaker 4] [--seed 0]
"""

from __future__ import annotations

import argparse
import random
import shutil
from pathlib import Path

from vqkit.data.cache import FeatureCache

SECONDS = (3.0, 8.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache", type=Path)
    parser.add_argument("corpus", type=Path, help="the folder the cache was prepared from")
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-speaker", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    by_speaker: dict[str, list[dict]] = {}
    for item in FeatureCache(args.cache).items("val"):
        if SECONDS[0] <= item["duration"] <= SECONDS[1]:
            by_speaker.setdefault(item["speaker"], []).append(item)
    args.out.mkdir(parents=True, exist_ok=True)
    rng, n = random.Random(args.seed), 0
    for speaker, items in sorted(by_speaker.items()):
        rng.shuffle(items)
        for item in items[: args.per_speaker]:
            source = args.corpus / item["path"]
            shutil.copy(source, args.out / f"{speaker}_{source.name}")
            n += 1
    print(f"copied {n} clips of {len(by_speaker)} speakers to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
