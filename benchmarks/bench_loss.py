"""Packet loss: vqkit's concealment against Opus's own, on the bundled sample.

Each clip (by default the four bundled held-out prompts, ``vqkit/assets/sample``, 12.6 s) is
coded once; packets are then dropped at random (each with probability 0, 5, 10 or 20 %, three
seeds each) or in bursts of 120 ms (placed at random, 5 and 10 % of the time), and the decoders
conceal what is missing: vqkit's stream decoder with ``push(None)``, Opus (libopus) by decoding
a NULL packet, its packet-loss concealment, called through ctypes with the same loss pattern
in time (Opus's packets are 20 ms, vqkit's 40 ms). The random rows are also run through
``opusdec --packet-loss`` (its own random drops) as a check. Scores are PESQ-NB and STOI against
the original, means over clips and seeds::

    .venv/bin/python benchmarks/bench_loss.py [--model M] [--bitrate 1.2] [--opus-kbps 6]
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from vqkit.audio.io import read_audio, write_audio
from vqkit.codec.codec import load_codec
from vqkit.eval.metrics import pesq_nb, stoi

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = sorted((ROOT / "vqkit" / "assets" / "sample").glob("*.flac"))
RATE = 16000
BURST_MS = 120
CONDITIONS = [("random", p) for p in (0.0, 0.05, 0.10, 0.20)] + [("burst", p) for p in (0.05, 0.10)]
SEEDS = (0, 1, 2)


def loss_mask(kind: str, fraction: float, n_packets: int, packet_ms: int, seed: int) -> np.ndarray:
    """Which packets are lost: each with probability ``fraction`` (random), or those touching
    bursts of :data:`BURST_MS` placed at random to cover ``fraction`` of the time (burst). The
    same seed gives the same losses in time whatever the packet length."""
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.random(n_packets) < fraction
    duration = n_packets * packet_ms
    lost_ms = np.zeros(duration, dtype=bool)
    while lost_ms.mean() < fraction:
        start = int(rng.integers(0, max(1, duration - BURST_MS)))
        lost_ms[start : start + BURST_MS] = True
    return lost_ms.reshape(n_packets, packet_ms).any(1)


def vqkit_lossy(codec, wave: np.ndarray, bitrate: float, kind: str, fraction: float, seed: int):
    encoder = codec.stream_encoder(bitrate, gain_db=codec._gain([wave]))
    packets = encoder.push(wave) + encoder.flush()
    decoder = codec.stream_decoder(encoder.header.to_bytes())
    packet_ms = round(1000 * encoder.header.frame_samples / RATE)
    lost = loss_mask(kind, fraction, len(packets), packet_ms, seed)
    out = [decoder.push(None if gone else p) for p, gone in zip(packets, lost, strict=True)]
    return np.concatenate([*out, decoder.flush()])[: len(wave)]


class Opus:
    """libopus through ctypes: CBR speech at ``kbps``, 20 ms packets, its concealment."""

    FRAME = RATE // 50

    def __init__(self, kbps: float) -> None:
        name = ctypes.util.find_library("opus") or "libopus.so.0"
        self.lib, self.kbps = ctypes.CDLL(name), kbps
        self.lib.opus_encoder_create.restype = ctypes.c_void_p
        self.lib.opus_decoder_create.restype = ctypes.c_void_p

    def packets(self, wave: np.ndarray) -> tuple[list[bytes], int]:
        error = ctypes.c_int()
        enc = ctypes.c_void_p(self.lib.opus_encoder_create(RATE, 1, 2048, ctypes.byref(error)))
        for request, value in ((4002, int(self.kbps * 1000)), (4006, 0), (4024, 3001)):
            self.lib.opus_encoder_ctl(enc, request, ctypes.c_int(value))  # bitrate, CBR, voice
        lookahead = ctypes.c_int()
        self.lib.opus_encoder_ctl(enc, 4027, ctypes.byref(lookahead))
        pcm = np.round(np.clip(wave, -1, 1) * 32767).astype(np.int16)
        pcm = np.pad(pcm, (0, -len(pcm) % self.FRAME + self.FRAME))
        buffer, packets = (ctypes.c_ubyte * 4000)(), []
        for i in range(0, len(pcm), self.FRAME):
            frame = np.ascontiguousarray(pcm[i : i + self.FRAME])
            n = self.lib.opus_encode(
                enc, frame.ctypes.data_as(ctypes.c_void_p), self.FRAME, buffer, 4000
            )
            packets.append(bytes(buffer[:n]))
        self.lib.opus_encoder_destroy(enc)
        return packets, lookahead.value

    def decode(self, packets: list[bytes], lost: np.ndarray, skip: int, length: int) -> np.ndarray:
        error = ctypes.c_int()
        dec = ctypes.c_void_p(self.lib.opus_decoder_create(RATE, 1, ctypes.byref(error)))
        out, frame = [], np.zeros(self.FRAME, dtype=np.int16)
        for packet, gone in zip(packets, lost, strict=True):
            data = None if gone else packet
            n = self.lib.opus_decode(
                dec,
                data,
                0 if gone else len(packet),
                frame.ctypes.data_as(ctypes.c_void_p),
                self.FRAME,
                0,
            )
            out.append(frame[: max(n, 0)].astype(np.float32) / 32768)
        self.lib.opus_decoder_destroy(dec)
        return np.concatenate(out)[skip : skip + length]


def opusdec_lossy(wave: np.ndarray, kbps: float, percent: float, tmp: Path) -> np.ndarray:
    src, coded, dst = tmp / "in.wav", tmp / "x.opus", tmp / "out.wav"
    write_audio(src, wave, RATE)
    subprocess.run(
        ["opusenc", "--quiet", "--speech", "--hard-cbr", "--bitrate", f"{kbps:g}", src, coded],
        check=True,
    )
    subprocess.run(
        ["opusdec", "--quiet", "--rate", str(RATE), "--packet-loss", f"{percent:g}", coded, dst],
        check=True,
    )
    return read_audio(dst, RATE)[0][: len(wave)]


def score(wave: np.ndarray, decoded: np.ndarray) -> tuple[float, float]:
    decoded = np.pad(decoded, (0, len(wave) - len(decoded)))
    return pesq_nb(wave, decoded, RATE), stoi(wave, decoded, RATE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--bitrate", type=float, default=1.2)
    parser.add_argument("--opus-kbps", type=float, default=6.0)
    parser.add_argument("--audio", nargs="*", type=Path, default=SAMPLE)
    args = parser.parse_args()
    torch.set_num_threads(1)
    codec, opus = load_codec(args.model), Opus(args.opus_kbps)
    waves = [read_audio(path, RATE)[0] for path in args.audio]
    rows: dict[tuple[str, str, float], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for wave in waves:
            packets, skip = opus.packets(wave)
            for kind, fraction in CONDITIONS:
                for seed in SEEDS if fraction else SEEDS[:1]:
                    y = vqkit_lossy(codec, wave, args.bitrate, kind, fraction, seed)
                    rows.setdefault(("vqkit", kind, fraction), []).append(score(wave, y))
                    lost = loss_mask(kind, fraction, len(packets), 20, seed)
                    y = opus.decode(packets, lost, skip, len(wave))
                    rows.setdefault(("opus", kind, fraction), []).append(score(wave, y))
                    if kind == "random" and shutil.which("opusdec"):
                        y = opusdec_lossy(wave, args.opus_kbps, 100 * fraction, Path(tmp))
                        rows.setdefault(("opusdec", kind, fraction), []).append(score(wave, y))
    names = {
        "vqkit": f"vqkit {args.bitrate:g} kbit/s",
        "opus": f"Opus {args.opus_kbps:g} kbit/s (libopus PLC)",
        "opusdec": f"Opus {args.opus_kbps:g} kbit/s (opusdec --packet-loss)",
    }
    print(f"{len(waves)} clips: " + ", ".join(p.name for p in args.audio))
    print("| system | loss | PESQ-NB | STOI |\n|---|---|---|---|")
    for (system, kind, fraction), scores in sorted(rows.items(), key=lambda r: r[0][1:]):
        pesq = statistics.mean(s[0] for s in scores)
        intel = statistics.mean(s[1] for s in scores)
        loss = f"{100 * fraction:g} % {kind}" + (f" ({BURST_MS} ms)" if kind == "burst" else "")
        print(f"| {names[system]} | {loss} | {pesq:.2f} | {intel:.3f} |")


if __name__ == "__main__":
    main()
