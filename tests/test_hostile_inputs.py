"""Hostile and careless input, second round (issue #17): what got past the bad-input table.

Each test drives the ``vqkit`` command (or the Python API) the way a careless or hostile user
would, with the tiny random-weight model of :mod:`test_guarantees`, and checks the promise: one
clear line naming the file, or a result that is whole and true.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import test_guarantees
from test_guarantees import RATE, assert_fails, crafted, tone, vqkit_cli

from vqkit.audio.io import pcm_range, write_audio_blocks
from vqkit.cli import main
from vqkit.codec.codec import load_codec
from vqkit.errors import VqkitError, shown

# test_guarantees' fixtures, made anew for this module: the tiny model and a short code file of it
model = test_guarantees.model
code_file = test_guarantees.code_file


def test_untrusted_text_is_shown_escaped_and_short() -> None:
    assert shown("\x1b]0;title\x07\x1b[2J\nnext") == "\\x1b]0;title\\x07\\x1b[2J\\nnext"
    assert shown("\u202etxt.exe \udcff") == "\\u202etxt.exe \\udcff"  # bidi override, bad byte
    assert shown("x" * 500, limit=20) == "x" * 17 + "..."
    assert shown("a plain 'name'.wav") == "a plain 'name'.wav"


def test_file_names_with_escape_sequences_are_printed_escaped(tmp_path: Path, capfd) -> None:
    """A corpus file named with terminal control codes, broken and named in prepare's summary:
    the name arrives escaped, never as a sequence the terminal would obey."""
    (tmp_path / "corpus").mkdir()
    sf.write(tmp_path / "corpus" / "fine.wav", tone(800), RATE)
    (tmp_path / "corpus" / "\x1b]0;title\x07\x1b[2J\nok.wav").write_text("not audio")
    argv = [
        "prepare",
        tmp_path / "corpus",
        tmp_path / "cache",
        "--set",
        f"audio.sample_rate={RATE}",
    ]
    status, out, err = vqkit_cli(capfd, *argv)
    assert status == 0, err
    assert "\x1b" not in out + err and "\x07" not in out + err
    assert "failed: \\x1b]0;title\\x07\\x1b[2J\\nok.wav: " in out


def test_non_finite_samples_are_written_as_silence(tmp_path) -> None:
    """A model gone wrong must not write full-scale noise: NaN and Inf become 0."""
    wave = np.array([np.nan, np.inf, -np.inf, 0.5, 2.0, -3.0], np.float32)
    assert pcm_range(wave).tolist() == [0, 0, 0, 0.5, 1, -1]
    write_audio_blocks(tmp_path / "x.wav", [wave[:2], wave[2:]], RATE)
    written = sf.read(tmp_path / "x.wav", dtype="float32")[0]
    np.testing.assert_allclose(written, [0, 0, 0, 0.5, 32767 / 32768, -1], atol=1e-4)


# ---- messages that say what is wrong ------------------------------------------------------------


def not_a_file(kind: str) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        if kind == "fifo":
            os.mkfifo(folder / "in.wav")
        elif kind == "folder":
            (folder / "in.wav").mkdir()
        return Path("/dev/stdin") if kind == "stdin" else folder / "in.wav"

    return make


INPUTS = {
    "fifo": "in.wav: it is a pipe \\(FIFO\\), not a regular file; give an audio file",
    "folder": "in.wav: it is a folder, not an audio file",
    "stdin": "/dev/stdin: it is a (pipe|device)",  # whatever stdin is under the test runner
}  # "-" is standard input: raw PCM for encode, a packet stream for decode (tests/test_pipes.py)


@pytest.mark.parametrize("kind", INPUTS)
def test_inputs_that_are_not_files_are_named_for_what_they_are(
    kind: str, model: Path, tmp_path: Path, capfd
) -> None:
    source = not_a_file(kind)(tmp_path)
    if kind == "stdin" and Path("/dev/stdin").resolve().is_file():
        pytest.skip("stdin is a regular file here, which vqkit reads")
    output = tmp_path / "out.vqc"
    assert_fails(capfd, ["encode", source, output, "--model", model], INPUTS[kind], output)
    assert_fails(
        capfd, ["decode", source, tmp_path / "o.wav", "--model", model], "cannot read", output
    )


def test_a_model_that_is_a_pipe_is_named_for_what_it_is(tmp_path: Path, capfd) -> None:
    os.mkfifo(tmp_path / "model.safetensors")
    sf.write(tmp_path / "in.wav", tone(RATE), RATE)
    argv = [
        "encode",
        tmp_path / "in.wav",
        tmp_path / "x.vqc",
        "--model",
        tmp_path / "model.safetensors",
    ]
    message = "model.safetensors: it is a pipe \\(FIFO\\), not a regular file; give a checkpoint"
    assert_fails(capfd, argv, message, tmp_path / "x.vqc")


BITRATES = {
    "nan": "bitrate must be a positive number of kbit/s, got nan",
    "inf": "bitrate must be a positive number of kbit/s, got inf",
    "0": "bitrate must be a positive number of kbit/s, got 0",
    "-1": "bitrate must be a positive number of kbit/s, got -1",
    "0.1": "bitrate 0.1 kbit/s is below this model's lowest",
    "1,2": "encode: argument --bitrate: invalid float value: '1,2' \\(see vqkit encode --help\\)",
    "abc": "encode: argument --bitrate: invalid float value: 'abc'",
}


@pytest.mark.parametrize("bitrate", BITRATES)
def test_bad_bitrates_are_one_line_and_exit_1(
    bitrate: str, model: Path, tmp_path: Path, capfd
) -> None:
    sf.write(tmp_path / "in.wav", tone(RATE), RATE)
    argv = ["encode", tmp_path / "in.wav", tmp_path / "x.vqc", "--model", model, "--bitrate"]
    assert_fails(capfd, [*argv, bitrate], BITRATES[bitrate], tmp_path / "x.vqc")


def test_argument_errors_exit_1_with_one_line(tmp_path: Path, capfd) -> None:
    """The README promises exit 1 and one line for every bad input, argparse's included."""
    assert_fails(capfd, ["encode"], "encode: the following arguments are required", tmp_path)
    assert_fails(capfd, ["frobnicate"], "argument VERB: invalid choice: 'frobnicate'", tmp_path)
    assert_fails(
        capfd, ["viz", "vq", "--out", tmp_path / "a.gif", "--steps", "x"], "--steps", tmp_path
    )
    with pytest.raises(SystemExit) as done:
        main(["encode", "--help"])
    assert done.value.code == 0 and capfd.readouterr().out.startswith("usage: vqkit encode")


def test_config_errors_name_the_recipe(tmp_path: Path, capfd) -> None:
    (tmp_path / "recipe.toml").write_text("[train]\nsteps = 'many'\n")
    argv = ["train", tmp_path / "recipe.toml", "--data", tmp_path, "--run", tmp_path / "run"]
    message = "error: .*recipe.toml: train.steps must be int, got 'many'"
    assert_fails(capfd, argv, message, tmp_path / "run")
    message = r"recipe.toml \(with --set overrides\): train.steps must be int"
    assert_fails(capfd, [*argv, "--set", "train.lr=0.1"], message, tmp_path / "run")


def test_finite_samples_too_large_for_float32_are_not_called_nan(model: Path, tmp_path, capfd):
    wave = tone(RATE).astype(np.float64)
    wave[100] = 1e300
    sf.write(tmp_path / "in.wav", wave, RATE, subtype="DOUBLE")
    output = tmp_path / "x.vqc"
    message = r"in.wav: samples reach 1e\+300, beyond float32's range \(3.4e\+38\)"
    assert_fails(capfd, ["encode", tmp_path / "in.wav", output, "--model", model], message, output)
    wave[100] = 1e30  # far above full scale, but a float32: valid audio
    sf.write(tmp_path / "in.wav", wave, RATE, subtype="DOUBLE")
    assert vqkit_cli(capfd, "encode", tmp_path / "in.wav", output, "--model", model)[0] == 0


def test_a_bad_device_is_blamed_not_the_checkpoint(model: Path, tmp_path: Path, capfd) -> None:
    argv = ["evaluate", model, "--data", tmp_path, "--out", tmp_path / "out", "--device", "evil"]
    message = "device must be one of auto, cpu, cuda or cuda:N, got 'evil'"
    assert_fails(capfd, argv, message, tmp_path / "out")


def test_code_file_errors_name_the_file(model: Path, code_file: bytes, tmp_path: Path, capfd):
    (tmp_path / "bad.vqc").write_bytes(crafted(code_file, id="0123456789abcdef"))
    (tmp_path / "cut.vqc").write_bytes(code_file[:-3])
    for name, message in (
        ("bad", "the code file was made by model"),
        ("cut", "truncated code file"),
    ):
        argv = ["decode", tmp_path / f"{name}.vqc", tmp_path / "o.wav", "--model", model]
        assert_fails(capfd, argv, f"error: {tmp_path}/{name}.vqc: {message}", tmp_path / "o.wav")


# ---- the Python API ---------------------------------------------------------------------------


def test_the_api_takes_numpy_rates_integer_pcm_bytes_and_paths(model: Path, tmp_path: Path):
    codec = load_codec(model)
    wave = tone(RATE)
    encoded = codec.encode(wave, RATE)
    for rate in (np.int64(RATE), np.int32(RATE), float(RATE), np.float32(RATE)):
        again = codec.encode(wave, rate)
        assert again.to_bytes() == encoded.to_bytes(), type(rate)
    pcm = np.round(wave * 32768).clip(-32768, 32767).astype(np.int16)
    scaled = codec.encode(pcm.astype(np.float32) / 32768, RATE).to_bytes()
    assert codec.encode(pcm, RATE).to_bytes() == scaled  # int16 by its full scale
    unsigned = (pcm.astype(np.int32) + 32768).astype(np.uint16)
    assert codec.encode(unsigned, RATE).to_bytes() == scaled  # unsigned around its midpoint
    data = encoded.to_bytes()
    (tmp_path / "x.vqc").write_bytes(data)
    decoded = codec.decode(encoded)
    for source in (data, bytearray(data), tmp_path / "x.vqc", str(tmp_path / "x.vqc")):
        np.testing.assert_array_equal(codec.decode(source), decoded)


API_REFUSALS = {
    "complex samples": (np.complex64, RATE, "complex samples; pass real audio"),
    "string samples": (np.str_, RATE, "samples of type <U.* are not audio"),
    "a fractional rate": (np.float32, 8000.5, "whole number of Hz, got 8000.5"),
    "a NaN rate": (np.float32, float("nan"), "whole number of Hz, got nan"),
    "a rate as text": (np.float32, "8000", "must be a number of Hz, got '8000'"),
    "a rate of True": (np.float32, True, "must be a number of Hz, got True"),
    "a rate of 100 Hz": (np.float32, np.int16(100), "sample rate 100 Hz is outside 4000"),
}


@pytest.mark.parametrize("case", API_REFUSALS)
def test_the_api_refuses_before_encoding(case: str, model: Path, monkeypatch) -> None:
    dtype, rate, message = API_REFUSALS[case]
    codec = load_codec(model)
    monkeypatch.setattr(codec, "_encode_stream", lambda *a: pytest.fail("encoding started"))
    with pytest.raises(VqkitError, match=message):
        codec.encode(tone(RATE).astype(dtype), rate)


def test_the_api_refuses_what_is_not_a_code_file(model: Path, tmp_path: Path) -> None:
    codec = load_codec(model)
    with pytest.raises(VqkitError, match="expected EncodedAudio, the bytes .*, got int"):
        codec.decode(3)
    with pytest.raises(VqkitError, match="not a vqkit code file"):
        codec.decode(b"RIFF0000WAVE")
    with pytest.raises(VqkitError, match=f"cannot read {tmp_path}/none.vqc: no such file"):
        codec.decode(tmp_path / "none.vqc")


# ---- corpora: nothing outside the root, nothing cut short ---------------------------------------


def test_prepare_refuses_links_out_of_the_corpus_and_truncated_wavs(tmp_path: Path, capfd):
    """A folder corpus holding a link to a file outside it, a link to a file inside it (fine),
    a link to a folder outside it (not walked) and a WAV cut short: only whole files inside the
    root are prepared, the others named with their reason."""
    root, outside = tmp_path / "corpus", tmp_path / "outside"
    (root / "ann").mkdir(parents=True)
    outside.mkdir()
    for folder, name in ((root / "ann", "a.wav"), (root / "ann", "b.wav"), (outside, "secret.wav")):
        sf.write(folder / name, tone(800), RATE, subtype="PCM_16")
    (root / "ann" / "secret.wav").symlink_to(outside / "secret.wav")
    (root / "ann" / "again.wav").symlink_to(root / "ann" / "a.wav")
    (root / "elsewhere").symlink_to(outside)
    (root / "ann" / "cut.wav").write_bytes((root / "ann" / "b.wav").read_bytes()[:600])
    argv = ["prepare", root, tmp_path / "cache", "--set", f"audio.sample_rate={RATE}"]
    status, out, err = vqkit_cli(capfd, *argv, "--set", "data.val_fraction=0.0")
    assert status == 0, err
    assert "prepared 3 utterances" in out and "2 failed" in out, out
    assert "failed: ann/secret.wav: " in out and "a symbolic link out of the corpus root" in out
    assert "failed: ann/cut.wav: " in out and "truncated WAV file" in out
    rows = (tmp_path / "cache" / "manifest.jsonl").read_text()
    assert "secret" not in rows and "cut.wav" not in rows and "again.wav" in rows


def test_image_folders_refuse_links_out_of_the_root(tmp_path: Path) -> None:
    from PIL import Image

    from vqkit.config import load_config
    from vqkit.data.prepare import prepare

    root, outside = tmp_path / "pictures", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    for folder, name in ((root, "a.png"), (root, "b.png"), (outside, "secret.png")):
        Image.fromarray(np.zeros((6, 5), np.uint8)).save(folder / name)
    (root / "c.png").symlink_to(outside / "secret.png")
    config = load_config(None, ["data.val_fraction=0.0", "data.test_fraction=0.0"])
    summary = prepare(root, tmp_path / "cache", config, progress=False)
    assert summary.n_ok == 2 and dict(summary.failed) == {
        "c.png": "a symbolic link out of the corpus root; not followed"
    }


# ---- bench: one odd clip does not sink the run; names stay apart --------------------------------


@pytest.fixture(scope="module")
def odd_bench(model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    """``vqkit bench`` (the model at one bitrate, and the oracle) on a folder of odd clips: 10 ms,
    one sample, a file that is not audio, three names that clean up alike, and one clip whose
    spectrogram plot fails. Returns the output folder, results.json and what was printed."""
    from vqkit.eval import report

    clips, out = tmp_path_factory.mktemp("clips"), tmp_path_factory.mktemp("bench") / "out"
    sf.write(clips / "normal.wav", tone(RATE // 2), RATE)
    sf.write(clips / "ten ms.wav", tone(RATE // 100), RATE)
    sf.write(clips / "one sample.wav", tone(1), RATE)
    (clips / "not audio.wav").write_text("hello")
    for i, name in enumerate(("a b.wav", "a_b.wav", "a_b.flac")):
        sf.write(clips / name, tone(RATE // 4) * (i + 1) / 4, RATE)
    plot = report.plot_spectrograms

    def fails_on_normal(waves, rate, path):
        if "normal" in path.name:
            raise RuntimeError("the plot broke")
        plot(waves, rate, path)

    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.setattr(report, "plot_spectrograms", fails_on_normal)
        argv = ["bench", clips, "--out", out, "--model", model, "--bitrates", "0.5"]
        argv += ["--baselines", "oracle"]
        assert main([str(a) for a in argv]) == 0
    return out, json.loads((out / "results.json").read_text()), printed.getvalue()


def test_a_clip_that_cannot_be_read_scored_or_plotted_does_not_sink_the_bench(odd_bench):
    out, results, printed = odd_bench
    assert (
        results["unread"] == [{"file": "not audio.wav", "reason": results["unread"][0]["reason"]}]
        and "cannot decode audio" in results["unread"][0]["reason"]
    )
    assert "not scored: not audio.wav: " in printed
    rows = {(r["system"], r["clip"]): r for r in results["clips"]}
    assert {clip for _, clip in rows} == {"normal", "ten_ms", "one_sample", "a_b", "a_b-2", "a_b-3"}
    tiny = [r for (_, clip), r in rows.items() if clip in ("ten_ms", "one_sample")]
    assert all(r["audio"] and "error" in r["pesq_nb"] for r in tiny)  # decoded; PESQ says why not
    assert results["report_errors"] == [{"clip": "normal", "reason": "the plot broke"}]
    assert "no spectrograms of normal: the plot broke" in printed
    page = (out / "report.html").read_text()
    assert "Not scored, not audio.wav" in page and "No spectrograms: the plot broke" in page
    assert (out / "plots" / "spectrogram--ten_ms.png").is_file()
    assert (out / "plots" / "spectrogram--one_sample.png").is_file()


def test_bench_keeps_clips_whose_names_clean_up_alike_apart(odd_bench):
    out, results, _ = odd_bench
    files = {name: results["files"][name] for name in ("a_b", "a_b-2", "a_b-3")}
    assert files == {"a_b": "a b.wav", "a_b-2": "a_b.flac", "a_b-3": "a_b.wav"}
    audio = [r["audio"] for r in results["clips"] if r["audio"]]
    assert len(audio) == len(set(audio)) == 3 * 6  # the original, the model, the oracle; six clips
    levels = [np.abs(sf.read(out / "audio" / f"{n}--original.wav")[0]).max() for n in files]
    assert levels[0] < levels[2] < levels[1]  # each its own file: scaled 1/4, 3/4, 2/4
