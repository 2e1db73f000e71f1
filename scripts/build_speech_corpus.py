"""Build the 16 kHz speech corpus that the shipped codec is trained and evaluated on.

Everything comes from Debian packages (see ../shared/DATA.md for licences), so any Debian machine
rebuilds the same corpus:

- Asterisk core prompts (G.722, 16 kHz): en/es Allison (f), ru IvrvoiceRU (f) -> train;
  it Carlo (m) and fr June (f) -> test, held out as whole voices.
- Fish Fillets NG dialogue, Czech and Dutch (Ogg Vorbis, 22.05 kHz, several actors) -> train.
- KLettres letters and syllables and KTuberling words (one volunteer per language, home
  microphones) -> train, for the variety of voices and microphones. Every language of the unseen
  development bench (scripts/build_unseen_bench.py) is left out of both packages, so no bench voice
  is trained on; short recordings of a voice are joined with short gaps into files of a few seconds.

Output: OUT/train/<voice>/*.wav and OUT/test/<voice>/*.wav, 16 kHz mono 16-bit, and OUT/bench/: a
fixed selection of held-out sentences (3-10 s, the same number from each held-out voice) for
`vqkit bench`.
Usage: python scripts/build_speech_corpus.py OUT [--debs DIR] [--bench-clips N]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import av
import numpy as np
import soundfile as sf
from build_unseen_bench import GAP_SECONDS, KLETTRES, KTUBERLING, MIN_SOURCE_RATE, TUXPAINT

from vqkit.audio.io import read_audio, write_audio

SAMPLE_RATE = 16000
ASTERISK = {"en": "train", "es": "train", "ru": "train", "it": "test", "fr": "test"}
FILLETS = ("cs", "nl")
# Languages of the unseen bench, in any of its corpora (a volunteer may have recorded for two)
BENCH_LANGUAGES = {*KLETTRES, *KTUBERLING, *TUXPAINT, "en_GB"}
KDE_SOUNDS = {"klettres": "klettres", "ktuberling": "ktuberling/sounds"}
PACKAGES = [f"asterisk-core-sounds-{lang}-g722" for lang in ASTERISK] + [
    f"fillets-ng-data-{lang}" for lang in FILLETS
]
PACKAGES += [f"{name}-data" for name in KDE_SOUNDS]
MIN_SECONDS = 1.0
JOINED_SECONDS = 4.0  # short recordings of one voice are joined until a file is this long
BENCH_SECONDS = (3.0, 10.0)


def fetch_packages(debs: Path) -> None:
    """Download the Debian packages into ``debs`` unless they are already there."""
    debs.mkdir(parents=True, exist_ok=True)
    missing = [p for p in PACKAGES if not list(debs.glob(f"{p}_*.deb"))]
    if missing:
        subprocess.run(["apt-get", "download", *missing], cwd=debs, check=True)


def unpack(debs: Path, root: Path) -> None:
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)


def read_g722(path: Path) -> np.ndarray:
    """Decode an Asterisk G.722 prompt to float32 (T,) at 16 kHz (libsndfile cannot read G.722)."""
    with av.open(str(path), format="g722") as container:
        frames = [f.to_ndarray().reshape(-1) for f in container.decode(audio=0)]
    return np.concatenate(frames).astype(np.float32) / 32768.0


def convert(items: list[tuple[Path, Path]], reader) -> int:
    written = 0
    for src, dst in items:
        if dst.exists():
            written += 1
            continue
        try:
            wave = reader(src)
        except Exception as e:  # a corrupt source file is skipped, not fatal
            print(f"skip {src}: {e}", file=sys.stderr)
            continue
        if wave.shape[0] < MIN_SECONDS * SAMPLE_RATE:
            continue
        write_audio(dst, wave, SAMPLE_RATE)
        written += 1
    return written


def joined(paths: list[Path]):
    """Consecutive recordings of one voice joined with :data:`GAP_SECONDS` of silence, yielded as
    float32 waveforms of at least :data:`JOINED_SECONDS` (the shorter rest is dropped)."""
    gap = np.zeros(round(GAP_SECONDS * SAMPLE_RATE), dtype=np.float32)
    parts: list[np.ndarray] = []
    for path in paths:
        if sf.info(str(path)).samplerate < MIN_SOURCE_RATE:
            continue
        parts += [read_audio(path, SAMPLE_RATE)[0], gap]
        if sum(map(len, parts)) >= JOINED_SECONDS * SAMPLE_RATE:
            yield np.concatenate(parts[:-1])
            parts = []


def build_kde(root: Path, out: Path) -> None:
    """KLettres and KTuberling voices whose language is not on the unseen bench -> OUT/train."""
    for name, folder in KDE_SOUNDS.items():
        for lang_dir in sorted(p for p in (root / "usr/share" / folder).iterdir() if p.is_dir()):
            if lang_dir.name in BENCH_LANGUAGES or "@" in lang_dir.name:  # sr@latin: sr again
                continue
            paths = sorted(lang_dir.rglob("*.ogg"))
            voice = out / "train" / f"{name}_{lang_dir.name}"
            n = 0
            for n, wave in enumerate(joined(paths), 1):
                write_audio(voice / f"{n:04d}.wav", wave, SAMPLE_RATE)
            if n:
                print(f"{name} {lang_dir.name}: {n} joined files -> train")


def select_bench(out: Path, per_voice: int) -> None:
    """Copy ``per_voice`` held-out sentences of 3-10 s from each test voice to OUT/bench/.

    Clips are taken evenly over the sorted file list, so the selection is deterministic.
    """
    for voice_dir in sorted((out / "test").iterdir()):
        clips = []
        for f in sorted(voice_dir.rglob("*.wav")):
            seconds = sf.info(str(f)).duration
            if BENCH_SECONDS[0] <= seconds <= BENCH_SECONDS[1]:
                clips.append(f)
        step = max(1, len(clips) // per_voice)
        for f in clips[::step][:per_voice]:
            dst = out / "bench" / f"{voice_dir.name}_{f.stem}.wav"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dst)
        print(f"bench: {min(per_voice, len(clips[::step]))} clips of {voice_dir.name}")


def build(out: Path, debs: Path) -> None:
    fetch_packages(debs)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        unpack(debs, root)
        sounds = root / "usr/share/asterisk/sounds"
        for voice_dir in sorted(sounds.iterdir()):
            split = ASTERISK[voice_dir.name[:2]]
            items = [
                (f, out / split / voice_dir.name / (str(f.relative_to(voice_dir))[:-5] + ".wav"))
                for f in sorted(voice_dir.rglob("*.g722"))
            ]
            print(f"{voice_dir.name}: {convert(items, read_g722)} clips -> {split}")
        levels = root / "usr/share/games/fillets-ng/sound"
        for lang in FILLETS:
            items = [
                (f, out / "train" / f"fillets_{lang}" / f"{f.parts[-3]}_{f.stem}.wav")
                for f in sorted(levels.glob(f"*/{lang}/*.ogg"))
            ]
            n = convert(items, lambda p: read_audio(p, SAMPLE_RATE)[0])
            print(f"fillets {lang}: {n} clips -> train")
        build_kde(root, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--debs", type=Path, default=Path("corpora/debs"))
    parser.add_argument("--bench-clips", type=int, default=12, help="held-out clips per voice")
    args = parser.parse_args(argv)
    build(args.out, args.debs)
    select_bench(args.out, args.bench_clips)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
