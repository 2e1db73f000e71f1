"""Fine-tune a parametric codec's envelope decoder end to end, through the harmonic-plus-noise
synthesiser, with a multi-resolution STFT loss on the waveform.

The encoder, the codebooks and the pitch and voicing codes stay fixed: each step codes random
1-second crops of training utterances (the cache's ``train`` split only) at a random number of
stages, decodes the envelope, synthesises the waveform and compares it with the original at three
STFT resolutions (spectral convergence + log-magnitude L1, as in Parallel WaveGAN and DDSP).
Checkpoints every ``--save-every`` steps to OUT (weights and optimizer: rerunning continues), which
``vqkit bench --model OUT`` reads like any checkpoint.
Usage: python scripts/finetune_synthesis.py MODEL CACHE CORPUS OUT [--steps 1500] [--lr 1e-4]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vqkit.audio.io import read_audio
from vqkit.audio.stft import stft
from vqkit.audio.synthesis import make_synthesiser
from vqkit.checkpoint import load_checkpoint, save_checkpoint
from vqkit.codec.codec import Codec
from vqkit.codec.side import pitch_codes, pitch_from_codes
from vqkit.data.cache import FeatureCache
from vqkit.errors import VqkitError
from vqkit.run import resolve_model

RESOLUTIONS = ((1024, 256), (512, 128), (256, 64))  # (n_fft, hop)


def stft_loss(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Multi-resolution STFT loss: spectral convergence + L1 of log magnitudes, averaged."""
    total = y.new_zeros(())
    for n_fft, hop in RESOLUTIONS:
        s_y = stft(y, n_fft, hop).abs() + 1e-5
        s_x = stft(x, n_fft, hop).abs() + 1e-5
        convergence = (s_x - s_y).norm() / s_x.norm()
        total = total + convergence + (s_x.log() - s_y.log()).abs().mean()
    return total / len(RESOLUTIONS)


class Crops:
    """Random crops of the training utterances, read once and kept in memory."""

    def __init__(self, cache: Path, corpus: Path, rate: int, seconds: float, seed: int) -> None:
        items = FeatureCache(cache).items("train")
        self.waves = [read_audio(corpus / item["path"], rate)[0] for item in tqdm(items, "read")]
        self.length = int(seconds * rate)
        self.waves = [w for w in self.waves if len(w) > self.length]
        self.rng = random.Random(seed)

    def batch(self, size: int) -> torch.Tensor:
        crops = []
        for wave in self.rng.choices(self.waves, k=size):
            start = self.rng.randrange(len(wave) - self.length)
            crops.append(wave[start : start + self.length])
        return torch.from_numpy(np.stack(crops))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a parametric run folder or checkpoint")
    parser.add_argument("cache", type=Path, help="the feature cache it was trained on")
    parser.add_argument("corpus", type=Path, help="the folder that cache was prepared from")
    parser.add_argument("out", type=Path, help="the fine-tuned checkpoint (.safetensors)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)

    resumed = args.out.is_file()
    checkpoint = load_checkpoint(args.out if resumed else resolve_model(args.model))
    codec = Codec(checkpoint)
    if not codec.parametric:
        raise VqkitError(f"{args.model}: not a parametric model (features.kind 'envelope')")
    model, d = codec.model, codec.downsample
    synthesiser = make_synthesiser(checkpoint.config.codec, codec.frontend)
    optimizer = torch.optim.Adam(model.decoder.parameters(), lr=args.lr)
    if resumed and checkpoint.optimizer is not None:
        optimizer.load_state_dict(checkpoint.optimizer)
    step = int(checkpoint.meta.get("finetune_step", 0))
    crops = Crops(args.cache, args.corpus, codec.sample_rate, args.seconds, args.seed + step)

    def save() -> None:
        settings = {key: str(value) for key, value in vars(args).items()}
        meta = {**checkpoint.meta, "finetune_step": step, "finetune": settings}
        save_checkpoint(
            args.out,
            model,
            checkpoint.config,
            tensors=checkpoint.tensors,
            meta=meta,
            optimizer=optimizer,
        )

    model.eval()  # the codebooks and batch statistics stay as trained
    progress = tqdm(total=args.steps, initial=step, desc="finetune", unit="step")
    while step < args.steps:
        wave = crops.batch(args.batch)
        n_stages = random.Random(args.seed * 100003 + step).randint(1, codec.n_codebooks)
        with torch.no_grad():
            envelope, f0, voiced = codec.frontend.analyse(wave)
            normalised = codec.normaliser.normalise(envelope)
            codes = model.encode(normalised, n_stages, codec.beam)
            latent = model.bottleneck.dequantize(codes)
            f0_hat, voiced_hat = pitch_from_codes(pitch_codes(f0, voiced, d), d, f0.shape[-1])
        x_hat = model.decoder(latent)[..., : envelope.shape[-1]]
        envelope_hat = codec.normaliser.denormalise(x_hat, x_hat.new_zeros(1, 0))
        y = synthesiser(envelope_hat, wave.shape[-1], f0=f0_hat, voiced=voiced_hat)
        loss = stft_loss(y, wave)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.decoder.parameters(), 1.0)
        optimizer.step()
        step += 1
        progress.update()
        progress.set_postfix(loss=f"{loss.item():.4f}", stages=n_stages)
        if step % args.save_every == 0 or step == args.steps:
            save()
    progress.close()
    print(f"wrote {args.out} after {step} steps")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
