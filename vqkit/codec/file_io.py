"""The codec between files: audio file -> ``.vqc`` file (:func:`encode_file`) and back
(:func:`decode_file`), each a one-line summary for the CLI, with the output checks every writer
makes."""

from __future__ import annotations

import os

from vqkit.audio.io import open_audio_blocks, write_audio_blocks
from vqkit.codec.codec import load_codec
from vqkit.codec.codefile import EncodedAudio, read_code_file
from vqkit.errors import VqkitError
from vqkit.files import AUDIO_SUFFIXES, atomic_write_bytes, check_output
from vqkit.run import SHIPPED, model_for_codes, model_for_rate


def encode_file(
    input: str | os.PathLike,
    output: str | os.PathLike,
    model: str | os.PathLike = "default",
    bitrate: float | None = None,
    beam: int | None = None,
) -> str:
    """Encode an audio file to a ``.vqc`` code file; returns a one-line summary. ``"default"``
    codes 8 kHz input with the shipped narrowband model (:func:`vqkit.run.model_for_rate`);
    ``beam`` overrides the model's ``codec.beam``."""
    check_output(output, input, *_model_files(model), refuse_suffixes=AUDIO_SUFFIXES)
    sample_rate, blocks = open_audio_blocks(input)
    codec = load_codec(model_for_rate(model, sample_rate), beam=beam)
    n_stages = codec.n_stages(bitrate)  # fail on a bad bitrate before reading the audio
    gain = codec._gain(open_audio_blocks(input)[1]) if codec.config.codec.level_db else 0
    encoded = codec.encode_blocks(blocks, sample_rate, n_stages, gain)
    data = encoded.to_bytes()
    atomic_write_bytes(output, data)
    return f"{output}: {n_stages} stages, {_rates(encoded, len(data))}"


def decode_file(
    input: str | os.PathLike,
    output: str | os.PathLike,
    model: str | os.PathLike = "default",
    iters: int | None = None,
) -> str:
    """Decode a ``.vqc`` code file to a WAV or FLAC file; returns a one-line summary.
    ``"default"`` decodes codes of any shipped model (:func:`vqkit.run.model_for_codes`)."""
    check_output(output, input, *_model_files(model))
    encoded, n_bytes = read_code_file(input)
    codec = load_codec(model_for_codes(model, encoded.model_id))
    try:
        blocks = codec.decode_blocks(encoded, iters)
    except VqkitError as e:
        raise VqkitError(f"{input}: {e}") from None
    write_audio_blocks(output, blocks, encoded.orig_sample_rate)
    n_stages = encoded.n_stages - len(codec.side_layout(encoded)[1])
    return f"{output}: {n_stages} stages decoded, {_rates(encoded, n_bytes)}"


def _model_files(model: str | os.PathLike) -> list[str | os.PathLike]:
    """The model as an input path that no output may overwrite (none for a shipped one)."""
    return [] if os.fspath(model) in SHIPPED else [model]


def _rates(encoded: EncodedAudio, n_bytes: int) -> str:
    seconds = encoded.duration
    payload = encoded.payload_size()
    return (
        f"{seconds:.2f} s at {encoded.orig_sample_rate} Hz, {n_bytes} bytes: "
        f"{n_bytes * 8 / seconds / 1000:.3f} kbit/s with the header, "
        f"{payload * 8 / seconds / 1000:.3f} kbit/s without"
    )
