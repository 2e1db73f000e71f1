"""Turn a training run into a model the package can ship (e.g. vqkit/assets/default.safetensors).

Keeps the best checkpoint's weights, config and normaliser, drops the optimizer state, and keeps the
run's training curves (the `recon` and `sd_db` columns of metrics.jsonl) in the checkpoint's meta so
`vqkit bench` can plot them without the run folder. `--set codec.KEY=VALUE` changes decoding
settings (post-filter, Griffin-Lim iterations) and `--set features.pitch=METHOD` the encoder's
pitch tracker, which leave the weights alone. `--compact` writes an inference-only file: no
codebook training state, the decoder in float16 (the codes unchanged).
Usage: python scripts/ship_model.py RUN OUT.safetensors [--compact] [--set SECTION.KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vqkit.checkpoint import load_checkpoint, save_checkpoint
from vqkit.config import config_from_dict, config_to_dict, merge_overrides
from vqkit.errors import VqkitError
from vqkit.run import resolve_model
from vqkit.train.log import read_metrics

CURVE_KEYS = ("step", "split", "recon", "loss", "sd_db")


def ship(run: Path, out: Path, overrides: list[str], compact: bool = False) -> str:
    checkpoint = load_checkpoint(resolve_model(run))
    if any(not o.startswith(("codec.", "features.pitch=")) for o in overrides):
        raise VqkitError("only codec.* settings and features.pitch can change after training")
    config = config_from_dict(merge_overrides(config_to_dict(checkpoint.config), overrides))
    curves = [
        {k: row[k] for k in CURVE_KEYS if k in row} for row in read_metrics(run / "metrics.jsonl")
    ]
    meta = {**checkpoint.meta, "curves": curves, "run": run.name}
    save_checkpoint(
        out, checkpoint.model, config, tensors=checkpoint.tensors, meta=meta, compact=compact
    )
    return load_checkpoint(out).model_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--compact", action="store_true", help="inference only, decoder float16")
    args = parser.parse_args(argv)
    model_id = ship(args.run, args.out, args.overrides, args.compact)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB, model id {model_id})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
