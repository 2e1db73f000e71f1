"""Hostile and careless use, second round (issue 17), through the ``vqkit`` command.

Outputs that would destroy something (the input itself, a device, audio named as a code file),
resource sizes that would crash the process, absurd config values, damaged feature caches,
write failures (a full disk, the file size limit, names that are not UTF-8) and SIGTERM or SIGHUP
mid-write: each is one line ``vqkit: error: ...`` (or a clean interrupted exit) and leaves nothing
half-written behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from test_guarantees import RATE, assert_fails, save_tiny, tone, vqkit_cli

from vqkit.errors import VqkitError


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(
        tmp_path_factory.mktemp("model") / "tiny.safetensors", "codec.chunk_seconds=0.1"
    )


@pytest.fixture
def audio(tmp_path: Path) -> Path:
    sf.write(tmp_path / "in.wav", tone(RATE), RATE)
    return tmp_path / "in.wav"


def hidden_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ---- outputs that would destroy something ------------------------------------------------------


def test_encode_never_writes_over_its_input(
    model: Path, audio: Path, tmp_path: Path, capfd
) -> None:
    original = audio.read_bytes()
    (tmp_path / "link.vqc").symlink_to(audio)
    sf.write(tmp_path / "other.wav", tone(RATE)[::-1], RATE)
    cases = [
        (audio, "in.wav: the output would overwrite the input"),
        (tmp_path / "link.vqc", "link.vqc: the output would overwrite the input .*in.wav"),
        (tmp_path / "other.wav", r"other.wav: the name ends in .wav, an audio format"),
        (tmp_path / "new.flac", r"new.flac: the name ends in .flac, an audio format"),
    ]
    for output, message in cases:
        assert_fails(capfd, ["encode", audio, output, "--model", model], message, output)
    assert audio.read_bytes() == original
    assert (tmp_path / "link.vqc").is_symlink()


def test_decode_never_writes_over_its_input(model: Path, audio: Path, tmp_path: Path, capfd):
    assert vqkit_cli(capfd, "encode", audio, tmp_path / "x.vqc", "--model", model)[0] == 0
    (tmp_path / "x.wav").symlink_to(tmp_path / "x.vqc")
    argv = ["decode", tmp_path / "x.vqc", tmp_path / "x.wav", "--model", model]
    assert_fails(capfd, argv, "x.wav: the output would overwrite the input", tmp_path / "x.wav")
    argv = ["decode", tmp_path / "x.vqc", tmp_path / "m.wav", "--model", tmp_path / "m.wav"]
    shutil.copy(model, tmp_path / "m.wav")
    assert_fails(capfd, argv, "m.wav: the output would overwrite the input", tmp_path / "m.wav")


WRITERS: dict[str, Callable[[Path, Path], list[object]]] = {  # argv writing over an input
    "prepare": lambda d, m: ["prepare", d, d],
    "train": lambda d, m: ["train", d / "recipe.toml", "--data", d, "--run", d],
    "bench": lambda d, m: ["bench", d, "--out", d, "--model", m],
    "pager": lambda d, m: ["pager", d / "in.wav", "--model", m, "--out", d / "in.wav"],
    "pager page": lambda d, m: ["pager", d / "p.html", "--model", m, "--out", d / "p.html"],
    "export": lambda d, m: ["export", m, "--out", m],
    "generate": lambda d, m: ["generate", m, "--out", m],
    "evaluate": lambda d, m: ["evaluate", m, "--data", d, "--out", d],
}


@pytest.mark.parametrize("verb", WRITERS)
def test_every_writer_refuses_to_overwrite_its_input(
    verb: str, model: Path, audio: Path, tmp_path: Path, capfd
) -> None:
    (tmp_path / "recipe.toml").write_text("")
    (tmp_path / "p.html").write_text("<p>mine</p>")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    argv = WRITERS[verb](tmp_path, model)
    assert_fails(capfd, argv, "would overwrite the input|an audio format", tmp_path / "in.wav")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_a_fifo_or_device_gets_the_bytes_and_stays(model: Path, audio: Path, tmp_path, capfd):
    assert vqkit_cli(capfd, "encode", audio, tmp_path / "x.vqc", "--model", model)[0] == 0
    fifo = tmp_path / "pipe.vqc"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    status, _, err = vqkit_cli(capfd, "encode", audio, fifo, "--model", model)
    reader.join(60)
    assert status == 0, err
    assert received == [(tmp_path / "x.vqc").read_bytes()]
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert vqkit_cli(capfd, "encode", audio, "/dev/null", "--model", model)[0] == 0
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(tmp_path / "sock.vqc"))
        argv = ["encode", audio, tmp_path / "sock.vqc", "--model", model]
        assert_fails(capfd, argv, "sock.vqc: cannot write to a socket", tmp_path / "sock.vqc")
    assert hidden_files(tmp_path) == []


def test_standard_streams_are_left_to_the_caller(tmp_path: Path) -> None:
    """``-`` names stdin or stdout, not a file: never refused as an output or an input."""
    from vqkit.files import check_output

    assert check_output("-", "-", refuse_suffixes=(".wav",)) is None
    assert check_output(tmp_path / "x.vqc", "-") == tmp_path / "x.vqc"


# ---- resources: threads and sizes the machine cannot give ---------------------------------------


def test_threads_and_sizes_are_bounded(model: Path, audio: Path, tmp_path: Path, capfd) -> None:
    cores = len(os.sched_getaffinity(0))
    too_many = f"--threads must be 1..{cores} \\(the cores of this machine\\), got 100000"
    out = tmp_path / "out"
    cases = [
        (["pager", audio, "--model", model, "--out", out / "p.html"], too_many),
        (["bench", tmp_path, "--out", out, "--model", model], too_many),
        (["viz", "vq", "--out", out / "v.gif"], too_many),
        (["export", model, "--out", out], too_many),
        (["generate", model, "--out", out], too_many),
    ]
    for argv, message in cases:
        assert_fails(capfd, [*argv, "--threads", 100000], message, out)
    argv = ["viz", "vq", "--out", out / "v.gif", "--codebook-size", 10**9]
    assert_fails(capfd, argv, "codebook_size 0..1024; got 1, 60, 1000000000", out)
    argv = ["generate", model, "--out", out, "--n", 10**6]
    assert_fails(capfd, argv, r"need --n 1..256 and --seconds in \(0, 600\]", out)
    argv = ["generate", model, "--out", out, "--seconds", "inf"]
    assert_fails(capfd, argv, r"need --n 1..256 and --seconds in \(0, 600\]", out)
    assert vqkit_cli(capfd, "encode", audio, tmp_path / "x.vqc", "--model", model)[0] == 0
    argv = ["decode", tmp_path / "x.vqc", out / "y.wav", "--model", model, "--iters", 10**9]
    assert_fails(capfd, argv, r"--iters must be 0..10000 \(a finite number\), got 1000000000", out)
    argv = ["prepare", tmp_path, out, "--workers", 100000]
    assert_fails(capfd, argv, f"--workers must be 1..{cores}", out)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f"[train]\nthreads = {cores + 1}\n")
    argv = ["train", recipe, "--data", tmp_path, "--run", out]
    assert_fails(capfd, argv, f"train.threads must be 1..{cores} \\(the cores", out)


def test_a_model_too_big_for_memory_is_refused_before_allocating(tmp_path: Path, capfd) -> None:
    from vqkit.config import load_config
    from vqkit.limits import check_memory
    from vqkit.nn.model import build_model

    with pytest.raises(VqkitError, match=r"needs about 1024.0 GB of memory, more than the"):
        check_memory(2**40, "something")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("[model]\nhidden = 65536\nlatent_dim = 65536\n")
    with pytest.raises(VqkitError, match=r"training a model of [\d,]+ parameters .* needs about"):
        build_model(load_config(recipe), (257,))


# ---- absurd config values, refused as the config loads -----------------------------------------

ABSURD: dict[str, str] = {  # --set argument: message
    "train.batch_size=0": "train.batch_size must be 1..65536 (a finite number), got 0",
    "train.lr=nan": "train.lr must be 1e-12..10 (a finite number), got nan",
    "train.lr=-1": "train.lr must be 1e-12..10 (a finite number), got -1.0",
    "train.lr=inf": "train.lr must be 1e-12..10 (a finite number), got inf",
    "train.eval_batches=0": "train.eval_batches must be >= 1",
    "model.hidden=0": "model.hidden must be 1..65536",
    "bottleneck.codebook_size=1000000000": "bottleneck.codebook_size must be 1..65536",
    "codec.chunk_seconds=nan": "codec.chunk_seconds must be 0.01..86400",
    "train.steps=-5": "train.steps must be >= 1",
    "train.threads=-1": "train.threads must be 0..1024",
    "train.grad_clip=nan": "train.grad_clip must be >= 0 (a finite number), got nan",
    "train.warmup_steps=-10": "train.warmup_steps must be >= 0",
    "data.val_fraction=1.5": "data.val_fraction must be 0..1",
    "data.test_fraction=0.6": "data.val_fraction + data.test_fraction must be below 1",
    "model.filters=[32,0]": "model.filters must be 1..65536 (a finite number), got [32, 0]",
}


@pytest.mark.parametrize("override", ABSURD)
def test_absurd_config_values(override: str, tmp_path: Path, capfd) -> None:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("[data]\nval_fraction = 0.4\n" if "test_fraction" in override else "")
    argv = ["train", recipe, "--data", tmp_path, "--run", tmp_path / "run", "--set", override]
    assert_fails(capfd, argv, re.escape(ABSURD[override]), tmp_path / "run")


def test_every_number_in_a_config_has_a_range() -> None:
    """A new numeric key without a range would accept NaN and any size: name its range."""
    import typing

    from vqkit.config import RANGES, Config

    numeric = []
    for section, cls in typing.get_type_hints(Config).items():
        for key, tp in typing.get_type_hints(cls).items():
            item = (typing.get_args(tp) or (tp,))[0]
            if item in (int, float):
                numeric.append(f"{section}.{key}")
    assert sorted(numeric) == sorted(RANGES)


def test_absurd_values_in_a_checkpoint_config(model: Path, audio: Path, tmp_path, capfd) -> None:
    from test_guarantees import config

    config("codec", "level_db", float("inf"))(model, tmp_path / "bad.safetensors")
    argv = ["encode", audio, tmp_path / "x.vqc", "--model", tmp_path / "bad.safetensors"]
    assert_fails(
        capfd,
        argv,
        r"codec.level_db must be -120..0 \(a finite number\), got inf",
        tmp_path / "x.vqc",
    )


# ---- damaged feature caches ---------------------------------------------------------------------


def edit_json(name: str, change: Callable[[dict], object]) -> Callable[[Path], None]:
    def make(cache: Path) -> None:
        values = json.loads((cache / name).read_text())
        change(values)
        (cache / name).write_text(json.dumps(values))

    return make


def edit_manifest(line: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def make(cache: Path) -> None:
        lines = (cache / "manifest.jsonl").read_bytes().splitlines()
        (cache / "manifest.jsonl").write_bytes(b"\n".join([line(lines[0]), *lines[1:]]) + b"\n")

    return make


def shard_is_a_fifo(cache: Path) -> None:
    rows = [json.loads(line) for line in (cache / "manifest.jsonl").read_text().splitlines()]
    for name in {row["features"] for row in rows}:
        (cache / name).unlink()
        os.mkfifo(cache / name)


def frames_zero(line: bytes) -> bytes:
    return json.dumps({**json.loads(line), "frames": 0}).encode()


DAMAGED_CACHES: dict[str, tuple[Callable[[Path], None], str]] = {
    "stats without mean": (
        edit_json("stats.json", lambda v: v.pop("mean")),
        "'mean' must be a list",
    ),
    "mean a string": (
        edit_json("stats.json", lambda v: v.update(mean="x")),
        "'mean' must be a list",
    ),
    "mean short": (
        edit_json("stats.json", lambda v: v.update(mean=v["mean"][:3])),
        "'mean' has 3 values but 'std' 65",
    ),
    "std zero": (
        edit_json("stats.json", lambda v: v.update(std=[0.0] * len(v["std"]))),
        "'std' must be positive",
    ),
    "std NaN": (
        edit_json("stats.json", lambda v: v.update(std=[float("nan")] * len(v["std"]))),
        "'std' holds NaN or Inf",
    ),
    "ragged mean": (
        edit_json("stats.json", lambda v: v.update(mean=[[1.0], [2.0, 3.0]])),
        "'mean' holds something other than numbers",
    ),
    "manifest not UTF-8": (
        edit_manifest(lambda line: line.replace(b'"path": "', b'"path": "\xff', 1)),
        "manifest.jsonl:1 is not valid JSON",
    ),
    "manifest nested 100,000 deep": (
        edit_manifest(lambda line: b"[" * 100_000 + b"]" * 100_000),
        "manifest.jsonl:1 is not valid JSON",
    ),
    "frames 0": (edit_manifest(frames_zero), "manifest.jsonl:1: an item of 0 frames"),
    "a shard that is a FIFO": (shard_is_a_fifo, "no such shard file"),
}


@pytest.mark.parametrize("case", DAMAGED_CACHES)
def test_damaged_caches_are_one_line_errors(case: str, tiny_cache: Path, tmp_path, capfd) -> None:
    damage, message = DAMAGED_CACHES[case]
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache)
    damage(cache)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("[train]\nsteps = 1\ndevice = 'cpu'\nthreads = 1\n")
    argv = ["train", recipe, "--data", cache, "--run", tmp_path / "run"]
    assert_fails(capfd, argv, message, tmp_path / "run")


# ---- write failures: a full disk, the size limit, names that are not UTF-8 ----------------------


@contextlib.contextmanager
def file_size_limit(n_bytes: int) -> Iterator[None]:
    """Files this process writes cannot grow past ``n_bytes`` (EFBIG, as on a full disk)."""
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, limits[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)


def test_write_failures_name_the_path_and_cause(model: Path, audio: Path, tmp_path, capfd):
    """libsndfile (decode), safetensors (a checkpoint) and the manifest (prepare) each fail
    half-way: one line naming the file, nothing half-written, no lock left."""
    assert vqkit_cli(capfd, "encode", audio, tmp_path / "x.vqc", "--model", model)[0] == 0
    out = tmp_path / "out"
    out.mkdir()
    with file_size_limit(4096):
        argv = ["decode", tmp_path / "x.vqc", out / "y.wav", "--model", model]
        assert_fails(capfd, argv, "cannot write .*y.wav: the file size limit", out / "y.wav")
        with pytest.raises(VqkitError, match="cannot write .*m.safetensors: the file size limit"):
            save_tiny(out / "m.safetensors")
    assert list(out.iterdir()) == []


def test_prepare_on_a_full_disk_leaves_no_lock(tiny_speech_dir: Path, tmp_path: Path, capfd):
    out = tmp_path / "cache"
    with file_size_limit(4096):  # the config fits, a feature file does not
        status, _, err = vqkit_cli(capfd, "prepare", tiny_speech_dir, out)
    assert status == 1, err
    assert re.search(r"\nvqkit: error: cannot write .*: the file size limit .* reached\n$", err), (
        err
    )
    assert hidden_files(out) == []  # no lock, no temporary


def test_names_that_are_not_utf8(model: Path, audio: Path, tmp_path: Path, capfd) -> None:
    code, decoded = tmp_path / os.fsdecode(b"\xff.vqc"), tmp_path / os.fsdecode(b"\xfe.wav")
    assert vqkit_cli(capfd, "encode", audio, code, "--model", model)[0] == 0
    status, _, err = vqkit_cli(capfd, "decode", code, decoded, "--model", model)
    assert status == 0, err
    assert sf.info(os.fsencode(decoded)).frames == RATE
    save_tiny(tmp_path / os.fsdecode(b"\xfd.safetensors"))
    assert hidden_files(tmp_path) == []


# ---- SIGTERM and SIGHUP mid-write ----------------------------------------------------------------

# `vqkit decode` that stops after writing its first block and says so.
SLOW_DECODE = """
import sys, time
import soundfile
write = soundfile.SoundFile.write
def write_then_wait(self, data):
    write(self, data)
    print("writing", flush=True)
    time.sleep(60)
soundfile.SoundFile.write = write_then_wait
from vqkit.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_terminated_decode_leaves_no_temporary(signum, model: Path, tmp_path: Path, capfd):
    sf.write(tmp_path / "in.wav", tone(3 * RATE), RATE)
    assert (
        vqkit_cli(capfd, "encode", tmp_path / "in.wav", tmp_path / "x.vqc", "--model", model)[0]
        == 0
    )
    argv = ["decode", tmp_path / "x.vqc", tmp_path / "y.wav", "--model", model]
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_DECODE, *map(str, argv)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "writing"
        assert hidden_files(tmp_path)  # the temporary file is there
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 128 + signum, err
    assert err == f"vqkit: interrupted ({signal.Signals(signum).name})\n", err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.wav", "x.vqc"]


def test_a_later_write_removes_stale_temporaries(model: Path, audio: Path, tmp_path, capfd):
    """A temporary of a process that is gone (kill -9) is removed by the next write of the same
    name; one of a live process (a writer at work) is kept."""
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead, alive = int(gone.stdout), os.getpid()
    stale = tmp_path / f".x.vqc.{dead}.abcd1234.tmp"
    live = tmp_path / f".x.vqc.{alive}.abcd1234.tmp"
    other = tmp_path / f".y.vqc.{dead}.abcd1234.tmp"
    for path in (stale, live, other):
        path.write_bytes(b"half")
    assert vqkit_cli(capfd, "encode", audio, tmp_path / "x.vqc", "--model", model)[0] == 0
    assert not stale.exists() and live.exists() and other.exists()
    from vqkit.files import remove_stale_temporaries

    assert remove_stale_temporaries(tmp_path / "y.vqc") == [other]


# ---- memory: bounded by a block of frames, not the codec chunk or the recording ------------------

MEMORY_SCRIPT = """
import sys
import numpy as np, torch
from vqkit.audio.frontends import make_frontend
from vqkit.audio.synthesis import HarmonicNoise
from vqkit.config import load_config

torch.set_num_threads(1)
config = load_config(sys.argv[1])
rate = config.audio.sample_rate
frontend = make_frontend(config.features, rate)
synthesiser = HarmonicNoise(frontend, config.codec.noise_voiced)
t = np.arange(20 * rate) / rate  # 20 s, a codec chunk, of a voice at 60-90 Hz: many harmonics
wave = torch.tensor(np.sin(2 * np.pi * np.cumsum(75 + 15 * np.sin(t)) / rate), dtype=torch.float32)
# VmHWM: the peak of this program's own memory (ru_maxrss would keep the forked parent's, the
# whole test runner's, and hide what is measured here)
peak = lambda: int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024

def run(x):
    envelope, f0, voiced = frontend.analyse(x[None])
    analysed = peak()
    synthesiser(envelope, len(x), f0=f0, voiced=voiced)
    return analysed

with torch.inference_mode():
    run(wave[: rate // 2])  # warm up: allocator, FFT plans
    before = peak()
    analysed = run(wave)
print(analysed - before, peak() - analysed)
"""


def test_analysis_and_synthesis_memory_does_not_scale_with_the_chunk() -> None:
    """YIN and the harmonic synthesiser on a 20 s chunk (the shipped model's) used 130 MB and
    600 MB of work arrays; in blocks of frames they need a few MB."""
    recipe = Path(__file__).resolve().parents[1] / "configs" / "speech_parametric.toml"
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(recipe)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    analysis, synthesis = map(int, done.stdout.split())
    assert analysis < 60 * 2**20 and synthesis < 60 * 2**20, (analysis, synthesis)


def test_blocks_give_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """Working in blocks changes nothing: code packing is byte-identical, pitch tracking exact,
    the harmonics equal to float rounding."""
    from vqkit.audio import pitch as pitch_module
    from vqkit.audio import synthesis as synthesis_module
    from vqkit.audio.frontends import make_frontend
    from vqkit.codec.codefile import PACK_FRAMES, pack_codes, unpack_codes
    from vqkit.config import load_config

    rng = np.random.default_rng(0)
    sizes = (128, 1024, 3)
    codes = np.stack([rng.integers(0, k, 2 * PACK_FRAMES + 5) for k in sizes]).astype(np.uint16)
    packed = pack_codes(codes, sizes)
    monkeypatch.setattr("vqkit.codec.codefile.PACK_FRAMES", 10**9)
    assert pack_codes(codes, sizes) == packed
    monkeypatch.undo()
    assert np.array_equal(unpack_codes(packed, sizes, codes.shape[1]), codes)

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "speech_parametric.toml")
    frontend = make_frontend(config.features, config.audio.sample_rate)
    t = np.arange(3 * config.audio.sample_rate) / config.audio.sample_rate
    wave = torch.tensor(np.sin(2 * np.pi * 110 * t) * (t > 1), dtype=torch.float32)[None]
    envelope, f0, voiced = frontend.analyse(wave)
    synthesiser = synthesis_module.HarmonicNoise(frontend, config.codec.noise_voiced)
    blocked = (frontend.pitch(wave), synthesiser(envelope, wave.shape[-1], f0=f0, voiced=voiced))
    monkeypatch.setattr(pitch_module, "YIN_BLOCK_FRAMES", 10**9)
    monkeypatch.setattr(synthesis_module, "SYNTHESIS_BLOCK_FRAMES", 10**9)
    whole = (frontend.pitch(wave), synthesiser(envelope, wave.shape[-1], f0=f0, voiced=voiced))
    assert all(torch.equal(a, b) for a, b in zip(blocked[0], whole[0], strict=True))
    assert torch.allclose(blocked[1], whole[1], atol=1e-5)
