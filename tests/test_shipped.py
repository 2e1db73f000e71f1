"""Which shipped model codes what: "default" takes the narrowband model for 8 kHz input, and
decoding follows the model that made the codes, for files and packet streams alike."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import SAMPLE, TINY_PARAMETRIC_K, TINY_PARAMETRIC_RATE, save_random_codec
from conftest import tiny_parametric_config as config

import vqkit.run
from vqkit.audio.io import resample, write_audio
from vqkit.checkpoint import load_checkpoint
from vqkit.cli import main
from vqkit.codec.codefile import read_code_file
from vqkit.codec.packets import read_header
from vqkit.codec.pipes import decode_stream, encode_stream


@pytest.fixture
def shipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Ship tiny models as "default" (16 kHz) and "narrowband" (8 kHz): ``{name: model id}``."""
    files = {
        "default": config("audio.sample_rate=16000"),
        "narrowband": config(f"audio.sample_rate={TINY_PARAMETRIC_RATE}"),
    }
    for i, (name, cfg) in enumerate(list(files.items())):
        files[name] = save_random_codec(tmp_path / f"{name}.st", cfg, TINY_PARAMETRIC_K, seed=i)
    monkeypatch.setattr(vqkit.run, "shipped_model", files.get)
    vqkit.run._shipped_id.cache_clear()
    yield {name: load_checkpoint(path).model_id for name, path in files.items()}
    vqkit.run._shipped_id.cache_clear()


def test_default_codes_8_khz_files_with_the_narrowband_model(shipped, tmp_path, speech) -> None:
    write_audio(tmp_path / "nb.wav", speech, 8000)
    write_audio(tmp_path / "wb.wav", resample(speech, 8000, 16000), 16000)
    for band, rate in (("nb", 8000), ("wb", 16000)):
        assert main(["encode", str(tmp_path / f"{band}.wav"), str(tmp_path / f"{band}.vqc")]) == 0
        made_by = "narrowband" if band == "nb" else "default"
        assert read_code_file(tmp_path / f"{band}.vqc")[0].model_id == shipped[made_by]
        assert (
            main(["decode", str(tmp_path / f"{band}.vqc"), str(tmp_path / f"{band}.out.wav")]) == 0
        )
        assert sf.info(str(tmp_path / f"{band}.out.wav")).samplerate == rate


def test_default_streams_8_khz_pcm_with_the_narrowband_model(shipped, speech) -> None:
    pcm = (speech * 32767).astype("<i2").tobytes()
    packets = io.BytesIO()
    encode_stream(io.BytesIO(pcm), packets, "default", sample_rate=8000)
    assert read_header(io.BytesIO(packets.getvalue())).model_id == shipped["narrowband"]
    out = io.BytesIO()
    decode_stream(io.BytesIO(packets.getvalue()), out, "default")
    decoded = np.frombuffer(out.getvalue(), "<i2")
    assert abs(len(decoded) - len(speech)) < 8000 * 0.2 and np.abs(decoded).max() > 0


def test_without_a_narrowband_model_default_codes_everything(
    shipped, monkeypatch, tmp_path, speech
):
    only = {"default": vqkit.run.shipped_model("default")}
    monkeypatch.setattr(vqkit.run, "shipped_model", only.get)
    vqkit.run._shipped_id.cache_clear()
    write_audio(tmp_path / "nb.wav", speech, 8000)
    assert main(["encode", str(tmp_path / "nb.wav"), str(tmp_path / "nb.vqc")]) == 0
    assert read_code_file(tmp_path / "nb.vqc")[0].model_id == shipped["default"]
    assert (
        main(["encode", str(tmp_path / "nb.wav"), str(tmp_path / "x.vqc"), "--model", "narrowband"])
        == 1
    )


def test_encode_searches_the_stages_with_the_beam_asked_for(tmp_path: Path, capsys) -> None:
    """``--beam`` overrides the shipped model's search (4 paths) in files and streams; both
    searches' codes are the model's, and a width out of range is one line and exit 1."""
    clip = str(SAMPLE[0])
    files = {beam: tmp_path / f"beam{beam}.vqc" for beam in ("1", "4")}
    for beam, path in files.items():
        assert main(["encode", clip, str(path), "--bitrate", "1.3", "--beam", beam]) == 0
    greedy, searched = (read_code_file(path)[0] for path in files.values())
    assert greedy.model_id == searched.model_id and greedy.codes.shape == searched.codes.shape
    assert (greedy.codes != searched.codes).any()
    assert main(["encode", clip, str(tmp_path / "default.vqc"), "--bitrate", "1.3"]) == 0
    assert (tmp_path / "default.vqc").read_bytes() == files["4"].read_bytes()
    capsys.readouterr()
    for output in (tmp_path / "x.vqc", "-"):
        assert main(["encode", clip, str(output), "--beam", "0"]) == 1
        assert "--beam must be 1..1024" in capsys.readouterr().err
    assert not (tmp_path / "x.vqc").exists()
