"""Build development benches of real speech from corpora the shipped codec never trained on.

The default codec trained on Asterisk studio prompts and Fish Fillets game dialogue
(scripts/build_speech_corpus.py). These benches hold other speakers, languages, microphones and
rooms, all from Debian packages (see ../shared/DATA.md for licences), so any Debian machine
rebuilds the same clips:

- OUT/wideband: 16 kHz clips of 2-6 s, one per voice: Tux Paint stamp descriptions (one volunteer
  per language, home microphones), Hedgewars voice packs (acted and shouted; the processed "Robot"
  pack is left out), KLettres letters and syllables, KTuberling words. Short utterances of one voice
  are joined, in file order, with :data:`GAP_SECONDS` of silence until the clip is long enough.
- OUT/narrowband: 8 kHz clips: Italian phone prompts of asterisk-prompt-it-menardi-wav, and, when
  ``--fsdd`` is given, spoken digits of each FSDD speaker's official test takes (indices 0-4).
- OUT/room: the wideband clips in a reverberant room with noise, as a far microphone hears them:
  each convolved with an impulse response of its own (the direct sound, then a decaying noise
  tail: reverberation time and direct-to-reverberant ratio in :data:`ROOM_T60` and
  :data:`ROOM_DRR_DB`), then pink-ish noise added at :data:`ROOM_SNR_DB`, from a fixed seed.

Every choice is a pure function of the package contents (sorted file lists, fixed offsets), so the
selection is deterministic; the level of each recording is kept as it is.
Usage: python scripts/build_unseen_bench.py OUT [--debs DIR] [--fsdd DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import scipy.signal
import soundfile as sf

from vqkit.audio.io import read_audio, write_audio

PACKAGES = (
    "tuxpaint-stamps-default",
    "hedgewars-data",
    "klettres-data",
    "ktuberling-data",
    "asterisk-prompt-it-menardi-wav",
)
TUXPAINT = ("be", "bg", "ca", "da", "el", "es", "fr", "ro", "ru")
HEDGEWARS = ("British", "Default", "HillBilly", "Mobster", "Pirate", "Russian", "Singer")
KLETTRES = ("ar", "en", "hu", "nl", "uk")
KTUBERLING = ("da", "en", "lt")
SECONDS = (2.0, 6.0)  # length of a wideband clip
GAP_SECONDS = 0.2  # silence between joined utterances
MIN_SOURCE_RATE = 16000  # recordings below this rate are not wideband
NARROWBAND_CLIPS = 4  # Menardi prompts of 2-6 s, evenly over the sorted list
ROOM_T60 = (0.3, 0.6)  # seconds, uniform
ROOM_DRR_DB = (4.0, 10.0)  # direct over reverberant energy, uniform
ROOM_SNR_DB = (20.0, 30.0)  # the reverberant speech's mean power over the noise's, uniform
ROOM_SEED = 7


def fetch(debs: Path) -> None:
    """Download the Debian packages into ``debs`` unless they are already there."""
    debs.mkdir(parents=True, exist_ok=True)
    missing = [p for p in PACKAGES if not list(debs.glob(f"{p}_*.deb"))]
    if missing:
        subprocess.run(["apt-get", "download", *missing], cwd=debs, check=True)


def voices(root: Path) -> dict[str, list[Path]]:
    """Each wideband voice's recordings, sorted: ``{name: [path, ...]}``."""
    share = root / "usr/share"
    stamps = sorted((share / "tuxpaint/stamps").rglob("*_desc_*.ogg"))
    found = {
        f"tuxpaint_{lang}": [p for p in stamps if p.stem.endswith(f"_desc_{lang}")]
        for lang in TUXPAINT
    }
    for name in HEDGEWARS:
        found[f"hedgewars_{name}"] = sorted(
            (share / "games/hedgewars/Data/Sounds/voices" / name).glob("*.ogg")
        )
    for lang in KLETTRES:
        found[f"klettres_{lang}"] = sorted((share / "klettres" / lang).rglob("*.ogg"))
    for lang in KTUBERLING:
        found[f"ktuberling_{lang}"] = sorted((share / "ktuberling/sounds" / lang).glob("*.ogg"))
    return found


def wideband_clip(paths: list[Path], sample_rate: int) -> np.ndarray | None:
    """The first 2-6 s clip of one voice, from its middle on: a recording that long on its own,
    else consecutive recordings joined with short gaps; None when the voice has none."""
    paths = [p for p in paths if sf.info(str(p)).samplerate >= MIN_SOURCE_RATE]
    gap = np.zeros(round(GAP_SECONDS * sample_rate), dtype=np.float32)
    for start in [*range(len(paths) // 2, len(paths)), *range(len(paths) // 2)]:
        parts, total = [], 0.0
        for path in paths[start:]:
            wave = read_audio(path, sample_rate)[0]
            if total + len(wave) / sample_rate > SECONDS[1]:
                break
            parts += [wave, gap]
            total += (len(wave) + len(gap)) / sample_rate
            if total - GAP_SECONDS >= SECONDS[0]:
                return np.concatenate(parts[:-1])
    return None


def build_wideband(root: Path, out: Path) -> None:
    for name, paths in voices(root).items():
        clip = wideband_clip(paths, 16000)
        if clip is None:
            print(f"wideband: no 2-6 s clip of {name}")
            continue
        write_audio(out / f"{name}.wav", clip, 16000)
        print(f"wideband: {name} {len(clip) / 16000:.2f} s")


def build_narrowband(root: Path, out: Path, fsdd: Path | None) -> None:
    prompts = sorted((root / "usr/share/asterisk/sounds/it_IT_f_Menardi").rglob("*.wav"))
    fitting = [p for p in prompts if SECONDS[0] <= sf.info(str(p)).duration <= SECONDS[1]]
    step = max(1, len(fitting) // NARROWBAND_CLIPS)
    for path in fitting[::step][:NARROWBAND_CLIPS]:
        write_audio(out / f"menardi_{path.stem}.wav", read_audio(path, 8000)[0], 8000)
    if fsdd is None:
        return
    recordings = sorted((fsdd / "recordings").glob("*.wav"))
    for speaker in sorted({p.stem.split("_")[1] for p in recordings}):
        takes = [
            p
            for p in recordings
            if p.stem.split("_")[1] == speaker and int(p.stem.split("_")[2]) < 5
        ]
        digits = sorted(takes, key=lambda p: (p.stem.split("_")[2], p.stem.split("_")[0]))[:6]
        gap = np.zeros(round(GAP_SECONDS * 8000), dtype=np.float32)
        parts = [x for p in digits for x in (read_audio(p, 8000)[0], gap)][:-1]
        write_audio(out / f"fsdd_{speaker}.wav", np.concatenate(parts), 8000)
    print(f"narrowband: {len(list(out.glob('*.wav')))} clips")


def in_room(wave: np.ndarray, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """``wave`` through a random room (:data:`ROOM_T60`, :data:`ROOM_DRR_DB`) with noise
    (:data:`ROOM_SNR_DB`; a one-pole low-pass of white noise), peak at most 0.9."""
    t60 = rng.uniform(*ROOM_T60)
    t = np.arange(round(t60 * sample_rate)) / sample_rate
    tail = rng.standard_normal(len(t)) * 10 ** (-3 * t / t60)
    tail[: round(0.005 * sample_rate)] = 0.0  # the first reflections arrive after 5 ms
    tail *= np.sqrt(10 ** (-rng.uniform(*ROOM_DRR_DB) / 10) / np.sum(tail**2))
    tail[0] = 1.0  # the direct sound
    wet = scipy.signal.fftconvolve(wave.astype(np.float64), tail)[: len(wave)]
    noise = scipy.signal.lfilter([1.0], [1.0, -0.9], rng.standard_normal(len(wet)))
    snr = 10 ** (rng.uniform(*ROOM_SNR_DB) / 10)
    wet += noise * np.sqrt(np.mean(wet**2) / np.mean(noise**2) / snr)
    return (wet * min(1.0, 0.9 / np.abs(wet).max())).astype(np.float32)


def build_room(wideband: Path, out: Path) -> None:
    rng = np.random.default_rng(ROOM_SEED)
    for path in sorted(wideband.glob("*.wav")):
        write_audio(out / path.name, in_room(read_audio(path, 16000)[0], 16000, rng), 16000)
    print(f"room: {len(list(out.glob('*.wav')))} clips")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--debs", type=Path, default=Path("corpora/debs"))
    parser.add_argument("--fsdd", type=Path, help="FSDD folder (with recordings/) for 8 kHz digits")
    args = parser.parse_args(argv)
    fetch(args.debs)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for deb in sorted(args.debs.glob("*.deb")):
            subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
        build_wideband(root, args.out / "wideband")
        build_narrowband(root, args.out / "narrowband", args.fsdd)
    build_room(args.out / "wideband", args.out / "room")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
