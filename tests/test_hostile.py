"""Hostile and careless use, second round (issue #17): what got past the bad-input table.

Each test drives the ``vqkit`` command (or the Python API) the way a careless or hostile user
would, with the tiny random-weight model of :mod:`test_guarantees`, and checks the promise: one
clear line naming the file, or a result that is whole and true.
"""

from __future__ import annotations

import numpy as np
import soundfile as sf
from test_guarantees import RATE, assert_fails, tone, vqkit_cli  # noqa: F401 (fixtures)

from vqkit.audio.io import pcm_range, write_audio_blocks
from vqkit.errors import shown


def test_untrusted_text_is_shown_escaped_and_short() -> None:
    assert shown("\x1b]0;title\x07\x1b[2J\nnext") == "\\x1b]0;title\\x07\\x1b[2J\\nnext"
    assert shown("\u202etxt.exe \udcff") == "\\u202etxt.exe \\udcff"  # bidi override, bad byte
    assert shown("x" * 500, limit=20) == "x" * 17 + "..."
    assert shown("a plain 'name'.wav") == "a plain 'name'.wav"


def test_non_finite_samples_are_written_as_silence(tmp_path) -> None:
    """A model gone wrong must not write full-scale noise: NaN and Inf become 0."""
    wave = np.array([np.nan, np.inf, -np.inf, 0.5, 2.0, -3.0], np.float32)
    assert pcm_range(wave).tolist() == [0, 0, 0, 0.5, 1, -1]
    write_audio_blocks(tmp_path / "x.wav", [wave[:2], wave[2:]], RATE)
    written = sf.read(tmp_path / "x.wav", dtype="float32")[0]
    np.testing.assert_allclose(written, [0, 0, 0, 0.5, 32767 / 32768, -1], atol=1e-4)
