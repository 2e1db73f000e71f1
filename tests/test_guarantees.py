"""What vqkit promises its users, tested through the ``vqkit`` command.

Every bad input ends in exactly one line on stderr (``vqkit: error: ...``), exit status 1, no
traceback, and no output file (nor a temporary one beside it). Audio that is odd but valid
(silence, clipping, 4-384 kHz, many channels, an hour long) encodes and decodes. Code files are
checked byte by byte; checkpoints are never unpickled, and a damaged one never makes vqkit allocate
what it claims. The source is scanned for calls that could run code from a file or write a file
non-atomically.

A tiny random-weight model (8 kHz, 2 residual stages of 16 codes) keeps every case fast.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import subprocess
import sys
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import TINY_BARE_CODEC, save_random_codec
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from vqkit.checkpoint import load_checkpoint
from vqkit.cli import main
from vqkit.codec.codec import load_codec
from vqkit.codec.codefile import FORMAT_VERSION, MAGIC, EncodedAudio, pack_codes
from vqkit.config import load_config
from vqkit.errors import VqkitError

RATE = 8000
N_BINS = 65  # n_fft 128
TINY = [
    f"audio.sample_rate={RATE}",
    "features.n_fft=128",
    "features.hop_length=32",
    *TINY_BARE_CODEC,
    "model.downsample=4",
    "codec.gl_iters=1",
]


def save_tiny(path: Path, *overrides: str, seed: int = 0, meta: dict | None = None) -> Path:
    """A random-weight codec model (a real checkpoint: safetensors, config, normaliser)."""
    config = load_config(None, [*TINY, *overrides])
    return save_random_codec(path, config, N_BINS, seed=seed, meta=meta)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("model") / "tiny.safetensors")


@pytest.fixture(scope="module")
def code_file(model: Path, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A short valid code file of ``model`` (0.05 s: about 60 bytes)."""
    folder = tmp_path_factory.mktemp("code")
    sf.write(folder / "in.wav", tone(400), RATE, subtype="PCM_16")
    assert (
        main(["encode", str(folder / "in.wav"), str(folder / "x.vqc"), "--model", str(model)]) == 0
    )
    return (folder / "x.vqc").read_bytes()


def tone(n: int, rate: int = RATE, channels: int = 1) -> np.ndarray:
    """``n`` samples of a 220 Hz tone with a little noise, ``(n,)`` or ``(n, channels)``."""
    t = np.arange(n) / rate
    wave = 0.4 * np.sin(2 * np.pi * 220 * t) + 0.02 * np.random.default_rng(0).standard_normal(n)
    wave = wave.astype(np.float32)
    return (
        wave if channels == 1 else np.stack([wave * (c + 1) / channels for c in range(channels)], 1)
    )


def vqkit_cli(capfd: pytest.CaptureFixture, *argv: object) -> tuple[int, str, str]:
    """Run ``vqkit ARGV...`` in this process; returns (status, stdout, stderr) as the file
    descriptors saw them, so that output from C libraries counts too."""
    capfd.readouterr()
    status = main([str(a) for a in argv])
    out, err = capfd.readouterr()
    return status, out, err


def assert_fails(
    capfd: pytest.CaptureFixture, argv: list[object], message: str, output: Path
) -> None:
    """``vqkit ARGV`` exits 1 with one line ``vqkit: error: ...`` matching ``message``, and leaves
    neither ``output`` nor any new file beside it."""
    folder = output.parent if output.parent.is_dir() and output.parts[1] != "proc" else None
    before = sorted(folder.iterdir()) if folder else None
    existed = output.exists()
    status, _, err = vqkit_cli(capfd, *argv)
    assert status == 1, err
    assert err.count("\n") == 1 and err.startswith("vqkit: error: "), err
    assert re.search(message, err), err
    assert output.exists() == existed
    if folder:
        assert sorted(folder.iterdir()) == before


# ---- bad audio: a clear error and no output ----------------------------------------------------


def wav_bytes(wave: np.ndarray, rate: int = RATE, subtype: str = "PCM_16") -> bytes:
    import io

    buffer = io.BytesIO()
    sf.write(buffer, wave, rate, format="WAV", subtype=subtype)
    return buffer.getvalue()


def with_sample(value: float) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        wave = tone(RATE)
        wave[RATE // 2] = value
        sf.write(path, wave, RATE, subtype="FLOAT")

    return write


def at_rate(rate: int) -> Callable[[Path], None]:
    return lambda path: sf.write(path, tone(min(max(rate // 10, 8), 4000), rate), rate)


BAD_AUDIO: dict[str, tuple[Callable[[Path], object], str]] = {
    "empty file": (lambda p: p.write_bytes(b""), "cannot decode audio"),
    "not audio": (lambda p: p.write_text("hello, world\n" * 40), "cannot decode audio"),
    "truncated header": (lambda p: p.write_bytes(wav_bytes(tone(RATE))[:30]), "cannot decode"),
    "truncated data": (
        lambda p: p.write_bytes(wav_bytes(tone(RATE))[:5000]),
        r"truncated WAV file: its header promises 16000 bytes of audio, only 4956",
    ),
    "header only": (lambda p: p.write_bytes(wav_bytes(tone(RATE))[:44]), "truncated WAV file"),
    "zero-length audio": (
        lambda p: sf.write(p, np.zeros(0, np.float32), RATE),
        "audio has no samples",
    ),
    "NaN sample": (with_sample(np.nan), "audio contains NaN or Inf samples"),
    "Inf sample": (with_sample(np.inf), "audio contains NaN or Inf samples"),
    "-Inf sample": (with_sample(-np.inf), "audio contains NaN or Inf samples"),
    "rate 0 Hz": (
        lambda p: p.write_bytes(
            wav_bytes(tone(100))[:24] + b"\0\0\0\0" + wav_bytes(tone(100))[28:]
        ),
        "cannot decode audio",
    ),
    "1 Hz": (at_rate(1), r"sample rate 1 Hz is not supported \(vqkit reads 4000..384000 Hz\)"),
    "100 Hz": (at_rate(100), "sample rate 100 Hz is not supported"),
    "3999 Hz": (at_rate(3999), "sample rate 3999 Hz is not supported"),
    "400 kHz": (at_rate(400_000), "sample rate 400000 Hz is not supported"),
    "2 GHz": (at_rate(2**31 - 1), "sample rate 2147483647 Hz is not supported"),
    "a folder": (lambda p: p.mkdir(), "cannot read .*in.wav: it is a folder, not an audio file"),
    "missing": (lambda p: None, "no such file"),
}


@pytest.mark.parametrize("case", BAD_AUDIO)
def test_bad_audio_is_one_clear_error(case: str, model: Path, tmp_path: Path, capfd) -> None:
    make, message = BAD_AUDIO[case]
    make(tmp_path / "in.wav")
    output = tmp_path / "out.vqc"
    assert_fails(capfd, ["encode", tmp_path / "in.wav", output, "--model", model], message, output)


# ---- odd but valid audio: encodes and decodes to the same length and rate ------------------------


GOOD_AUDIO: dict[str, Callable[[Path], tuple[int, int]]] = {}


def good(name: str, wave: np.ndarray, rate: int = RATE, subtype: str = "PCM_16", fmt="WAV"):
    def write(path: Path) -> tuple[int, int]:
        sf.write(path, wave, rate, subtype=subtype, format=fmt)
        return len(wave), rate

    GOOD_AUDIO[name] = write


good("all silence", np.zeros(RATE, np.float32))
good("full-scale clipping", np.sign(tone(RATE)).clip(-1, 32767 / 32768))  # int16 extremes
good("float beyond full scale", 4 * tone(RATE), subtype="FLOAT")
good("one sample", np.full(1, 0.5, np.float32))
good("8 channels", tone(RATE, channels=8))
good("24-bit FLAC", tone(RATE), subtype="PCM_24", fmt="FLAC")
for _rate in (4000, 11025, 22050, 44100, 48000, 96000, 192000, 384000):
    good(f"{_rate} Hz", tone(_rate // 4, _rate), _rate)


@pytest.mark.parametrize("case", GOOD_AUDIO)
def test_valid_audio_round_trips(case: str, model: Path, tmp_path: Path, capfd) -> None:
    source, codes, decoded = tmp_path / "in.audio", tmp_path / "x.vqc", tmp_path / "out.wav"
    length, rate = GOOD_AUDIO[case](source)
    status, out, err = vqkit_cli(capfd, "encode", source, codes, "--model", model)
    assert status == 0 and err == "" and "2 stages" in out, err
    status, out, err = vqkit_cli(capfd, "decode", codes, decoded, "--model", model)
    assert status == 0 and err == "", err
    wave, decoded_rate = sf.read(decoded, dtype="float32")
    assert (wave.shape, decoded_rate) == ((length,), rate)
    assert np.isfinite(wave).all() and np.abs(wave).max() <= 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.audio", "out.wav", "x.vqc"]


def test_outputs_get_the_usual_permissions(model: Path, tmp_path: Path, capfd) -> None:
    """Files written through a temporary file keep the umask's mode, not mkstemp's 0600."""
    sf.write(tmp_path / "in.wav", tone(RATE), RATE)
    previous = os.umask(0o027)
    try:
        vqkit_cli(capfd, "encode", tmp_path / "in.wav", tmp_path / "x.vqc", "--model", model)
        vqkit_cli(capfd, "decode", tmp_path / "x.vqc", tmp_path / "y.wav", "--model", model)
        save_tiny(tmp_path / "m.safetensors")
    finally:
        os.umask(previous)
    for name in ("x.vqc", "y.wav", "m.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name


# ---- an hour of audio in bounded memory ----------------------------------------------------------

HOUR_SCRIPT = """
import json, sys
import numpy as np, soundfile as sf, torch
from vqkit.cli import main

torch.set_num_threads(1)
folder, model, minutes = sys.argv[1], sys.argv[2], [float(m) for m in sys.argv[3:]]
peaks = []
for m in minutes:
    path = f"{folder}/long.wav"
    with sf.SoundFile(path, "w", 16000, 1, "PCM_16") as f:  # 10 s blocks of a tone and noise
        t = np.arange(160000) / 16000
        noise = np.random.default_rng(0).standard_normal(t.size)
        block = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * noise
        for start in range(0, round(m * 60 * 16000), block.size):
            f.write(block[: round(m * 60 * 16000) - start].astype(np.float32))
    assert main(["encode", path, f"{folder}/long.vqc", "--model", model]) == 0
    # VmHWM: the peak of this program's own memory (ru_maxrss would keep the forked parent's)
    status = open("/proc/self/status").read()
    peaks.append(int(status.split("VmHWM:")[1].split()[0]) * 1024)
print(json.dumps(peaks))
"""


def encode_peaks(tmp_path: Path, model: Path, *minutes: float) -> list[int]:
    """Peak RSS (bytes) of one process after encoding each of these durations of 16 kHz audio in
    turn (the audio file itself is written in 10 s blocks)."""
    argv = [sys.executable, "-c", HOUR_SCRIPT, str(tmp_path), str(model), *map(str, minutes)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    (tmp_path / "long.wav").unlink()
    return json.loads(done.stdout.splitlines()[-1])


def test_an_hour_encodes_in_bounded_memory(model: Path, tmp_path: Path) -> None:
    """An hour at 16 kHz is 230 MB as float32; encoding it must not hold it: the peak stays
    under 1 GB and grows by less than 100 MB over encoding one minute (about 8 s on 1 core)."""
    one_minute, hour = encode_peaks(tmp_path, model, 1, 60)
    assert hour < 2**30, hour
    assert hour - one_minute < 100 * 2**20, (one_minute, hour)
    encoded = EncodedAudio.from_bytes((tmp_path / "long.vqc").read_bytes())
    assert encoded.length == 3600 * 16000 and encoded.orig_sample_rate == 16000


# ---- code files: truncation, bit flips, bad headers ----------------------------------------------


def test_code_file_truncated_at_every_byte(model: Path, code_file: bytes, tmp_path, capfd) -> None:
    for cut in range(len(code_file)):
        (tmp_path / "cut.vqc").write_bytes(code_file[:cut])
        argv = ["decode", tmp_path / "cut.vqc", tmp_path / "out.wav", "--model", model]
        assert_fails(capfd, argv, "truncated code file|wrong magic", tmp_path / "out.wav")


def test_every_single_bit_flip_is_caught(model: Path, code_file: bytes, tmp_path, capfd) -> None:
    message = "CRC mismatch|wrong magic|format version|truncated|header"
    for bit in range(8 * len(code_file)):
        data = bytearray(code_file)
        data[bit // 8] ^= 1 << bit % 8
        (tmp_path / "flip.vqc").write_bytes(bytes(data))
        argv = ["decode", tmp_path / "flip.vqc", tmp_path / "out.wav", "--model", model]
        assert_fails(capfd, argv, message, tmp_path / "out.wav")


def with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def crafted(code_file: bytes, **changes: object) -> bytes:
    """``code_file`` with header fields changed and a correct CRC."""
    size = struct.unpack_from("<H", code_file, 5)[0]
    header = {**json.loads(code_file[7 : 7 + size]), **changes}
    raw = json.dumps(header).encode()
    return with_crc(
        MAGIC + struct.pack("<BH", FORMAT_VERSION, len(raw)) + raw + code_file[7 + size : -4]
    )


BAD_CODE_FILES: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "empty": (lambda d: b"", "truncated code file"),
    "wrong magic": (lambda d: b"RIFF" + d[4:], "not a vqkit code file"),
    "newer version": (lambda d: d[:4] + bytes([FORMAT_VERSION + 1]) + d[5:], "newer than this"),
    "version 0": (lambda d: d[:4] + b"\0" + d[5:], "invalid format version 0"),
    "header size past the end": (
        lambda d: with_crc(d[:5] + struct.pack("<H", 65535) + d[7:-4]),
        "truncated code file",
    ),
    "2**33 frames claimed": (
        lambda d: crafted(d, t=2**33, n=2**35, len=(2**35 - 1) * 32),
        "truncated code file",
    ),
    "frames out of range": (lambda d: crafted(d, t=2**60), "'t' must be an integer"),
    "64 stages of 65536 codes": (
        lambda d: crafted(d, q=64, k=65536),
        "truncated code file|payload is",
    ),
    "header not JSON": (lambda d: with_crc(d[:7] + b"{" * (len(d) - 11)), "not valid JSON"),
    "deeply nested header": (
        lambda d: with_crc(MAGIC + struct.pack("<BH", 1, 60000) + b"[" * 60000),
        "not valid JSON",
    ),
    "payload a byte short": (lambda d: with_crc(d[:-5]), "truncated code file"),
    "unknown header field": (lambda d: crafted(d, x=1), "unknown field 'x'"),
    "another model": (lambda d: crafted(d, id="0123456789abcdef"), "made by model"),
    "another hop": (lambda d: crafted(d, hop=64, n=7), "does not fit its model|inconsistent"),
    "original rate 100 Hz": (
        lambda d: crafted(d, osr=100, len=13),
        r"'osr' must be an integer in 4000\.\.384000",
    ),
    "model rate 2 kHz": (lambda d: crafted(d, sr=2000), r"'sr' must be an integer in 4000"),
    "escape sequences in the model id": (  # printed escaped, on one line
        lambda d: crafted(d, id="\x1b]0;title\x07\x1b[2J\nvqkit: ok"),
        r"made by model '\\x1b\]0;title\\x07\\x1b\[2J\\nvqkit: ok', not this",
    ),
}


@pytest.mark.parametrize("case", BAD_CODE_FILES)
def test_bad_code_files(case: str, model: Path, code_file: bytes, tmp_path: Path, capfd) -> None:
    make, message = BAD_CODE_FILES[case]
    (tmp_path / "bad.vqc").write_bytes(make(code_file))
    argv = ["decode", tmp_path / "bad.vqc", tmp_path / "out.wav", "--model", model]
    tracemalloc.start()
    try:
        assert_fails(capfd, argv, message, tmp_path / "out.wav")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, peak  # whatever the header claims, nothing big is allocated


def test_decoding_a_folder_or_nothing(model: Path, tmp_path: Path, capfd) -> None:
    for source in (tmp_path / "missing.vqc", tmp_path):
        argv = ["decode", source, tmp_path / "out.wav", "--model", model]
        assert_fails(capfd, argv, "cannot read", tmp_path / "out.wav")


@st.composite
def plausible_code_files(draw: st.DrawFn, model_id: str) -> bytes:
    """Code files with a correct CRC whose fields are near what fits the tiny model."""
    t = draw(st.integers(1, 12))
    n = draw(st.integers(4 * t - 3, 4 * t) | st.integers(4 * t - 5, 4 * t + 1))
    osr = draw(st.sampled_from([1, 4000, 8000, 11025, 44100, 384000]) | st.integers(1, 384000))
    frames = n - 1 + draw(st.floats(-2.5, 2.5))  # the reader allows 2 frames of slack
    q = draw(st.sampled_from([1, 2, 2, 2, 3]))
    k = draw(st.sampled_from([16, 16, 16, 16, 16, 16, 2, 17, 65536]))
    codes = np.array(draw(st.lists(st.integers(0, k - 1), min_size=q * t, max_size=q * t)))
    header = {"id": model_id, "sr": RATE, "hop": 32, "n": n, "t": t, "osr": osr, "q": q, "k": k}
    header.update(len=round(frames * 32 * osr / RATE), g=draw(st.integers(-130, 130)))
    raw = json.dumps(header).encode()
    payload = pack_codes(codes.reshape(q, t), (k,) * q)
    return with_crc(MAGIC + struct.pack("<BH", FORMAT_VERSION, len(raw)) + raw + payload)


def test_fuzz_decoding_crafted_code_files(model: Path) -> None:
    """Files the reader may accept but no encoder wrote (any original rate, gain, stage count):
    decoding gives exactly ``len`` finite samples or a VqkitError, nothing else."""
    codec, seen = load_codec(model), {"decoded": 0, "refused": 0}

    @settings(max_examples=300, deadline=None, database=None, derandomize=True)
    @given(plausible_code_files(codec.model_id))
    def check(data: bytes) -> None:
        try:
            encoded = EncodedAudio.from_bytes(data)
            wave = codec.decode(encoded, iters=1)
        except VqkitError:
            seen["refused"] += 1
            return
        seen["decoded"] += 1
        assert wave.shape == (encoded.length,) and np.isfinite(wave).all()

    check()
    # both paths well exercised: the split moves with the draws (55 decoded alone, 36 run later)
    assert seen["decoded"] > 25 and seen["refused"] > 25, seen


# ---- checkpoints: never unpickled, checked before anything is built ----------------------------


class RunsCode:
    """A pickle that creates a file when unpickled: loading it must never get that far."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def tampered(
    metadata: dict[str, str] | None = None, tensors: Callable | None = None
) -> Callable[[Path, Path], None]:
    """A maker of a copy of a model with some metadata entries or tensors replaced."""

    def make(model: Path, target: Path) -> None:
        with safe_open(str(model), "pt") as f:
            meta, flat = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        flat = tensors(flat) if tensors else flat
        save_file(flat, str(target), metadata={**meta, **(metadata or {})})

    return make


def config(section: str, key: str, value: object) -> Callable[[Path, Path], None]:
    """A maker of a copy of a model whose config has ``section.key = value``."""

    def make(model: Path, target: Path) -> None:
        with safe_open(str(model), "pt") as f:
            values = json.loads(f.metadata()["config"])
        values[section][key] = value
        tampered({"config": json.dumps(values)})(model, target)

    return make


def weights(change: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Path, Path], None]:
    """Change every weight of the network (not the normaliser's statistics)."""
    network = ("model.", "model.normaliser.")
    return tampered(
        tensors=lambda flat: {
            k: change(v) if k.startswith(network[0]) and not k.startswith(network[1]) else v
            for k, v in flat.items()
        }
    )


def file(write: Callable[[Path], object]) -> Callable[[Path, Path], None]:
    return lambda model, target: write(target)


def evil_pickle(protocol: int) -> Callable[[Path, Path], None]:
    return file(lambda t: t.write_bytes(pickle.dumps(RunsCode(t.parent / "ran"), protocol)))


BAD_MODELS: dict[str, tuple[Callable[[Path, Path], object], str]] = {
    "missing": (file(lambda t: None), "does not exist"),
    "empty file": (file(lambda t: t.write_bytes(b"")), "not a safetensors checkpoint"),
    "garbage": (file(lambda t: t.write_bytes(os.urandom(300))), "not a safetensors checkpoint"),
    "torch.save zip": (file(lambda t: torch.save([1], t)), "pickled PyTorch file.*unpickle"),
    "torch.save legacy": (
        file(lambda t: torch.save([1], t, _use_new_zipfile_serialization=False)),
        "pickled PyTorch file",
    ),
    "pickle that runs code": (evil_pickle(4), "pickled PyTorch file"),
    "protocol 0 pickle": (evil_pickle(0), "not a safetensors checkpoint"),
    "foreign safetensors": (file(lambda t: save_file({"w": torch.zeros(2)}, t)), "not a vqkit"),
    "newer version": (
        tampered({"version": "2"}),
        "checkpoint version 2; this vqkit reads version 1",
    ),
    "another model's weights": (config("model", "hidden", 32), "checkpoint from another model"),
    "10**12 weights claimed": (config("model", "hidden", 10**6), r"model.hidden must be 1..65536"),
    "10**9 bins claimed": (
        tampered({"meta": '{"in_shape": [1000000000]}'}),
        "another model|needs about .* GB of memory",
    ),
    "negative size": (config("model", "hidden", -3), "model.hidden must be 1..65536"),
    "huge n_fft": (config("features", "n_fft", 10**9), "features.n_fft must be 2..65536"),
    "unknown config key": (config("model", "hiden", 3), "'model.hiden'; did you mean 'hidden'"),
    "config not an object": (tampered({"config": "[1]"}), "config is not a JSON object"),
    "deeply nested config": (tampered({"config": "[" * 10**5}), "config is not valid JSON"),
    "meta not an object": (tampered({"meta": '"in_shape"'}), "meta is not a JSON object"),
    "no input shape": (tampered({"meta": "{}"}), "input shape"),
    "damaged optimizer": (tampered({"optimizer": "{"}), "damaged optimizer or scheduler"),
    "NaN weights": (weights(lambda v: v * np.nan if v.is_floating_point() else v), "NaN or Inf"),
    "integer weights": (weights(lambda v: v.long()), "has dtype torch.int64: damaged"),
    "normaliser of another shape": (
        tampered(tensors=lambda flat: {**flat, "model.normaliser.meanstd.mean": torch.zeros(3)}),
        r"another model.*'normaliser.meanstd.mean'",
    ),
    "normaliser with zero std": (
        tampered(
            tensors=lambda flat: {**flat, "model.normaliser.meanstd.std": torch.zeros(N_BINS)}
        ),
        "normaliser's statistics are damaged",
    ),
    "normaliser with a negative std": (
        tampered(
            tensors=lambda flat: {**flat, "model.normaliser.meanstd.std": -torch.ones(N_BINS)}
        ),
        r"bad.safetensors: the normaliser's statistics are damaged \(std must be positive",
    ),
    "NaN normaliser mean": (
        tampered(
            tensors=lambda flat: {
                **flat,
                "model.normaliser.meanstd.mean": torch.full((N_BINS,), np.nan),
            }
        ),
        "bad.safetensors: weight 'normaliser.meanstd.mean' holds NaN or Inf",
    ),
    "infinite normaliser std, stored beside the weights (as the shipped model's)": (
        tampered(
            tensors=lambda flat: {
                **{k: v for k, v in flat.items() if "normaliser" not in k},
                "norm.mean": torch.zeros(N_BINS),
                "norm.std": torch.full((N_BINS,), np.inf),
            }
        ),
        "weight 'normaliser.meanstd.std' holds NaN or Inf",
    ),
    "NaN in another tensor": (
        tampered(tensors=lambda flat: {**flat, "extra": torch.tensor([0.0, -np.inf])}),
        "tensor 'extra' holds NaN or Inf",
    ),
    "model rate 1 Hz": (
        config("audio", "sample_rate", 1),
        "audio.sample_rate must be 4000..384000",
    ),
    "a folder, not a run": (file(Path.mkdir), "without checkpoints"),
}


@pytest.mark.parametrize("case", BAD_MODELS)
def test_bad_models_are_refused(case: str, model: Path, tmp_path: Path, capfd) -> None:
    make, message = BAD_MODELS[case]
    bad = tmp_path / "bad.safetensors"
    make(model, bad)
    sf.write(tmp_path / "in.wav", tone(RATE), RATE)
    output = tmp_path / "out.vqc"
    assert_fails(capfd, ["encode", tmp_path / "in.wav", output, "--model", bad], message, output)
    assert not (tmp_path / "ran").exists()


def test_zero_weights_still_encode(model: Path, tmp_path: Path, capfd) -> None:
    """A model whose output ignores its input (all weights zero) has no receptive field."""
    weights(lambda v: v * 0 if v.is_floating_point() else v)(model, tmp_path / "zero.safetensors")
    sf.write(tmp_path / "in.wav", tone(RATE), RATE)
    argv = [
        "encode",
        tmp_path / "in.wav",
        tmp_path / "x.vqc",
        "--model",
        tmp_path / "zero.safetensors",
    ]
    assert vqkit_cli(capfd, *argv)[0] == 0


@pytest.mark.parametrize("prefix", [b"\x80", b"PK"])
def test_header_sizes_that_look_like_a_pickle_still_load(prefix: bytes, tmp_path: Path) -> None:
    """A safetensors file starts with its header size; 1 in 32 of them starts with byte 0x80 and
    some with "PK", the marks of torch.save's formats. They are checkpoints all the same."""
    path = tmp_path / "m.safetensors"
    size = struct.unpack("<Q", save_tiny(path, meta={"pad": ""}).read_bytes()[:8])[0]
    target = int.from_bytes(prefix, "little")
    target += -(size - target) // 256 ** len(prefix) * -(256 ** len(prefix))  # next one >= size
    for pad in range(max(target - size - 8, 0), target - size + 8):  # headers pad to 8 bytes
        if save_tiny(path, meta={"pad": "x" * pad}).read_bytes().startswith(prefix):
            break
    else:
        pytest.fail(f"no padding gave a header size starting with {prefix!r}")
    assert load_checkpoint(path).meta["pad"] == "x" * pad


# ---- configs ---------------------------------------------------------------------------------


BAD_CONFIGS: dict[str, tuple[str, str]] = {  # TOML text or --set arguments, message
    "unknown key": ("[train]\nstepz = 3", "unknown config key 'train.stepz'; did you mean 'steps'"),
    "unknown section": ("[trian]\nsteps = 3", "unknown config key 'trian'; did you mean 'train'"),
    "string for int": ("[train]\nsteps = 'many'", "train.steps must be int, got 'many'"),
    "bool for int": ("[train]\nsteps = true", "train.steps must be int, got True"),
    "float for int": ("[model]\nhidden = 1.5", "model.hidden must be int, got 1.5"),
    "list for str": ("[train]\ndevice = ['cpu']", "train.device must be str"),
    "str for list": ("[model]\nfilters = 'abc'", "model.filters must be a list of int"),
    "value for section": ("train = 3", "config section 'train' must be a table"),
    "not TOML": ("[train\nsteps = 3", "cannot read config"),
    "not UTF-8": ("\udcff[train]", "cannot read config"),
    "--set unknown key": ("--set train.step=3", "unknown config key 'train.step'"),
    "--set without a value": ("--set train.steps", "--set expects section.key=value"),
    "--set wrong type": ("--set train.lr=fast", "train.lr must be float, got 'fast'"),
    "--set too deep": ("--set a.b.c=1", "--set expects section.key=value"),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_configs(case: str, tmp_path: Path, capfd) -> None:
    text, message = BAD_CONFIGS[case]
    extra = text.split() if text.startswith("--set") else []
    recipe = tmp_path / "recipe.toml"
    recipe.write_bytes(b"" if extra else text.encode(errors="surrogateescape"))
    argv = ["train", recipe, "--data", tmp_path / "cache", "--run", tmp_path / "run", *extra]
    assert_fails(capfd, argv, re.escape(message), tmp_path / "run")


def test_missing_config_file(tmp_path: Path, capfd) -> None:
    argv = ["train", tmp_path / "no.toml", "--data", tmp_path, "--run", tmp_path / "run"]
    assert_fails(capfd, argv, "config file .*no.toml does not exist", tmp_path / "run")


# ---- outputs that cannot be written -----------------------------------------------------------


def test_unwritable_outputs(model: Path, code_file: bytes, tmp_path: Path, capfd) -> None:
    """Running as root, permissions stop nothing: a path below a regular file cannot be written,
    nor can /proc, nor a path that is a folder."""
    sf.write(tmp_path / "in.wav", tone(RATE), RATE)
    (tmp_path / "x.vqc").write_bytes(code_file)
    (tmp_path / "file").write_text("a regular file")
    (tmp_path / "folder.vqc").mkdir()
    (tmp_path / "folder.wav").mkdir()
    cases = [
        ("encode", "in.wav", tmp_path / "file" / "out.vqc", "file is not a folder"),
        ("encode", "in.wav", Path("/proc/vqkit-test/out.vqc"), "cannot write /proc"),
        ("encode", "in.wav", tmp_path / "folder.vqc", "folder.vqc: it is a folder"),
        ("decode", "x.vqc", tmp_path / "file" / "out.wav", "file is not a folder"),
        ("decode", "x.vqc", Path("/proc/vqkit-test.wav"), "cannot write /proc"),
        ("decode", "x.vqc", tmp_path / "folder.wav", "folder.wav: it is a folder"),
    ]
    for verb, source, output, message in cases:
        argv = [verb, tmp_path / source, output, "--model", model]
        assert_fails(capfd, argv, message, output)


def test_unwritable_run_and_cache_folders(tiny_speech_dir: Path, tmp_path: Path, capfd) -> None:
    (tmp_path / "file").write_text("a regular file")
    out = tmp_path / "file" / "cache"
    assert_fails(capfd, ["prepare", tiny_speech_dir, out], "cannot write the feature cache", out)


def test_unwritable_run_folder(tiny_cache: Path, tmp_path: Path, capfd) -> None:
    (tmp_path / "file").write_text("a regular file")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("[train]\nsteps = 1\ndevice = 'cpu'\n")
    run = tmp_path / "file" / "run"
    argv = ["train", recipe, "--data", tiny_cache, "--run", run]
    assert_fails(capfd, argv, "cannot write .*file is not a folder", run)


# ---- the real command in a subprocess: nothing else reaches stderr -----------------------------


def test_the_command_prints_one_line_and_no_traceback(model: Path, tmp_path: Path) -> None:
    """Python warnings go to the real stderr, where pytest's capture hides them; run the entry
    point twice at once (a refused pickle, a good encode) and read what it printed."""
    torch.save({"w": torch.zeros(2)}, tmp_path / "pickled.pt")
    sf.write(tmp_path / "ok.wav", tone(RATE), RATE)
    runs = {
        "pickle": (["encode", "ok.wav", "c.vqc", "--model", "pickled.pt"], 1, "unpickle"),
        "valid": (["encode", "ok.wav", "d.vqc", "--model", model], 0, ""),
    }
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "vqkit", *map(str, argv)],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (argv, _, _) in runs.items()
    }
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        _, status, message = runs[name]
        assert proc.returncode == status, (name, err)
        assert "Traceback" not in err and "Warning" not in err, (name, err)
        assert err.count("\n") == status and message in err, (name, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.vqc", "ok.wav", "pickled.pt"]


# ---- corpus listings cannot point outside the corpus ------------------------------------------


def test_ljspeech_ids_cannot_leave_the_corpus(tmp_path: Path) -> None:
    from vqkit.config import DataConfig
    from vqkit.data.corpora import list_corpus

    (tmp_path / "wavs").mkdir()
    sf.write(tmp_path / "wavs" / "LJ001.wav", tone(RATE), RATE)
    for name in ("../../etc/passwd", "..\\x", ".hidden"):
        (tmp_path / "metadata.csv").write_text(f"LJ001|a|a\n{name}|b|b\n")
        with pytest.raises(VqkitError, match=r"metadata.csv:2: id .* is not a plain file name"):
            list_corpus(tmp_path, DataConfig(layout="ljspeech"))
