"""The parametric model's analysis, pitch and voicing codes, and harmonic-plus-noise synthesis."""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import TINY_PARAMETRIC_K as K
from conftest import TINY_PARAMETRIC_RATE as CODEC_RATE
from conftest import load_script, save_random_codec, tiny_parametric_config

from vqkit.audio.envelope import EnvelopeFrontend, fill_unvoiced
from vqkit.audio.frontends import make_frontend
from vqkit.audio.pitch import F0_MAX, F0_MIN, PitchTracker
from vqkit.audio.synthesis import Frames, HarmonicNoise, make_synthesiser
from vqkit.checkpoint import load_checkpoint, save_checkpoint
from vqkit.cli import main
from vqkit.codec.codec import Codec, load_codec
from vqkit.codec.side import PITCH_BITS, pitch_codes, pitch_from_codes, side_codebooks
from vqkit.config import PitchMethod, load_config, replace
from vqkit.data.cache import FeatureCache
from vqkit.data.prepare import prepare
from vqkit.errors import VqkitError
from vqkit.eval.baselines import Oracle
from vqkit.eval.metrics import active_level_db
from vqkit.run import resolve_model
from vqkit.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "configs"
RATE = 16000
HOP = 160
STEP = math.log(F0_MAX / F0_MIN) / (2**PITCH_BITS - 1)  # one log-F0 code
PITCH_METHODS = typing.get_args(PitchMethod)


@pytest.fixture(scope="module")
def frontend() -> EnvelopeFrontend:
    return EnvelopeFrontend(RATE, 1024, HOP, 640, 40)


def harmonic_tone(f0: float, seconds: float = 0.5, n_harmonics: int = 20) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    wave = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, n_harmonics + 1))
    return (0.3 * wave / np.abs(wave).max()).astype(np.float32)


@pytest.mark.parametrize("method", PITCH_METHODS)
@pytest.mark.parametrize("f0", [70.0, 120.0, 210.0, 380.0])
def test_pitch_of_a_harmonic_tone(f0: float, method: str) -> None:
    frontend = EnvelopeFrontend(RATE, 1024, HOP, 640, 40, method)
    _, track, voiced = frontend.analyse(torch.from_numpy(harmonic_tone(f0)))
    inner = slice(5, -5)  # away from the zero padding at the edges
    assert voiced[0, inner].all()
    np.testing.assert_allclose(track[0, inner].numpy(), f0, rtol=0.01)


@pytest.mark.parametrize("method", PITCH_METHODS)
def test_noise_and_silence_are_unvoiced(method: str) -> None:
    frontend = EnvelopeFrontend(RATE, 1024, HOP, 640, 40, method)
    noise = np.random.default_rng(0).normal(0, 0.1, RATE // 2).astype(np.float32)
    silence = np.zeros(RATE // 2, dtype=np.float32)
    _, _, voiced = frontend.analyse(torch.from_numpy(np.stack([noise, silence])))
    assert voiced[0].mean() < 0.05 and not voiced[1].any()


def test_tracking_holds_the_octave_where_the_first_dip_leaves_it() -> None:
    """A 90 Hz tone whose odd harmonics fade to a tenth: its half period dips under YIN's
    threshold, and the first dip jumps an octave up within a few frames; the tracker stays
    on the path it was on for longer."""
    t = np.arange(RATE) / RATE
    odd = np.interp(t, [0.0, 0.3, 0.7], [1.0, 1.0, 0.1])
    wave = sum((odd if k % 2 else 1.0) * np.sin(2 * np.pi * k * 90 * t) / k for k in range(1, 21))
    wave = torch.tensor(0.3 * wave / np.abs(wave).max(), dtype=torch.float32)[None]
    off = {}
    for method in PITCH_METHODS:
        f0, voiced = PitchTracker(RATE, HOP, method)(wave, 1 + RATE // HOP)
        assert voiced[0, 5:-5].all()
        off[method] = int((np.abs(1200 * np.log2(f0[0, 5:-5].numpy() / 90)) > 50).sum())
    assert off["tracked"] + 5 < off["yin"], off


@pytest.mark.parametrize("method", PITCH_METHODS)
def test_analysis_is_frame_local(method: str) -> None:
    """A chunk with the context the analysis reaches gives the same frames as the whole signal
    (the codec analyses chunk by chunk)."""
    frontend = EnvelopeFrontend(RATE, 1024, HOP, 640, 40, method)
    rng = np.random.default_rng(1)
    wave = np.concatenate([harmonic_tone(f) for f in (100, 180, 260)])
    wave += 0.01 * rng.standard_normal(wave.shape).astype(np.float32)
    whole = frontend.analyse(torch.from_numpy(wave))
    back, ahead = (math.ceil(max(r, 512) / HOP) for r in frontend.tracker.reach())
    first, last = 40, 90  # frames
    part = frontend.analyse(torch.from_numpy(wave[(first - back) * HOP : (last + ahead) * HOP]))
    for a, b in zip(whole, part, strict=True):
        torch.testing.assert_close(a[..., first:last], b[..., back : back + last - first])


def test_envelope_follows_the_level(frontend: EnvelopeFrontend) -> None:
    tone = torch.from_numpy(harmonic_tone(150))
    loud, f0, voiced = frontend.analyse(tone)
    quiet = frontend.envelope(tone[None] * 0.1, f0, voiced)
    difference = (loud - quiet)[..., 5:-5]
    assert torch.all(difference[loud[..., 5:-5] > -50] - 20 < 0.01)  # 20 dB down, floor aside


@pytest.mark.parametrize("f0", [100.0, 230.0])
def test_resynthesis_keeps_level_and_pitch(frontend: EnvelopeFrontend, f0: float) -> None:
    synthesiser = HarmonicNoise(frontend, noise_voiced=0.0)
    tone = harmonic_tone(f0, seconds=1.0)
    envelope, track, voiced = frontend.analyse(torch.from_numpy(tone))
    out = synthesiser(envelope, len(tone), f0=track, voiced=voiced)[0].numpy()
    inner = slice(RATE // 10, -RATE // 10)
    level = 10 * np.log10(np.mean(out[inner] ** 2) / np.mean(tone[inner] ** 2))
    assert abs(level) < 1.0
    _, track_out, _ = frontend.analyse(torch.from_numpy(out))
    np.testing.assert_allclose(track_out[0, 10:-10].numpy(), f0, rtol=0.01)


def test_noise_is_resynthesised_at_its_level(frontend: EnvelopeFrontend) -> None:
    noise = np.random.default_rng(2).normal(0, 0.05, RATE).astype(np.float32)
    envelope, track, voiced = frontend.analyse(torch.from_numpy(noise))
    out = HarmonicNoise(frontend, 0.03)(envelope, len(noise), f0=track, voiced=voiced * 0)
    level = 10 * np.log10(out[0].square().mean().item() / np.mean(noise**2))
    assert abs(level) < 1.0


def test_synthesis_is_differentiable_and_deterministic(frontend: EnvelopeFrontend) -> None:
    synthesiser = HarmonicNoise(frontend, 0.03)
    tone = torch.from_numpy(harmonic_tone(160, 0.3))
    envelope, track, voiced = frontend.analyse(tone)
    envelope.requires_grad_(True)
    out = synthesiser(envelope, tone.shape[0], f0=track, voiced=voiced)
    (grad,) = torch.autograd.grad(out.square().sum(), envelope)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    frames = Frames(envelope[0].detach(), track[0], voiced[0])
    torch.testing.assert_close(
        out[0], frames.synthesise(synthesiser, tone.shape[0]), rtol=0, atol=0
    )


def test_synthesis_takes_pitch_and_voicing_by_name(frontend: EnvelopeFrontend) -> None:
    synthesiser = HarmonicNoise(frontend, 0.03)
    envelope, track, voiced = frontend.analyse(torch.from_numpy(harmonic_tone(160, 0.3)))
    with pytest.raises(TypeError, match="f0"):
        synthesiser(envelope, 100)  # the old rows-stacked call
    with pytest.raises(ValueError, match=r"f0 and voiced \(B, N\), got .*\(1, 5\)"):
        synthesiser(envelope, 100, f0=track[:, :5], voiced=voiced)
    with pytest.raises(ValueError, match="Frames.voiced must be"):
        Frames(envelope[0], track[0], voiced[0, 1:])
    with pytest.raises(ValueError, match="both f0 and voiced"):
        Frames(envelope[0], track[0])


def test_frames_cut_and_join_along_the_frame_axis() -> None:
    features, f0, voiced = torch.randn(3, 10), torch.rand(10) * 100 + 80, torch.rand(10)
    frames = Frames(features, f0, voiced)
    assert frames.n_frames == 10 and frames[2:7].n_frames == 5
    torch.testing.assert_close(frames[2:7].features, features[:, 2:7])
    torch.testing.assert_close(frames[-1:].f0, f0[-1:])
    joined = Frames.cat([frames[:4], frames[4:]])
    for name in ("features", "f0", "voiced"):
        assert torch.equal(getattr(joined, name), getattr(frames, name))
    plain = Frames.cat([Frames(features[:, :3]), Frames(features[:, 3:])])
    assert plain.f0 is None and plain.voiced is None and torch.equal(plain.features, features)


def test_pitch_codes_round_trip() -> None:
    rng = np.random.default_rng(3)
    n = 37  # not a multiple of the code frame
    f0 = torch.from_numpy(np.exp(rng.uniform(np.log(60), np.log(450), (2, n)))).float()
    voiced = torch.from_numpy(rng.random((2, n)) < 0.7).float()
    codes = pitch_codes(f0, voiced, 4)
    assert codes.shape == (2, 3, math.ceil(n / 4))
    assert (codes < torch.tensor(side_codebooks(4))[:, None]).all() and (codes >= 0).all()
    f0_hat, voiced_hat = pitch_from_codes(codes, 4, n)
    torch.testing.assert_close(voiced_hat, voiced)
    # A share of two frames with one voiced frame (or steady pitch) comes back within a code.
    steady = torch.full((1, 16), 123.0)
    f0_hat, _ = pitch_from_codes(pitch_codes(steady, torch.ones(1, 16), 4), 4, 16)
    assert torch.all((f0_hat.log() - math.log(123.0)).abs() <= STEP / 2 + 1e-6)


def test_pitch_codes_depend_on_their_own_frames_only() -> None:
    f0, voiced = torch.full((1, 16), 200.0), torch.ones(1, 16)
    voiced[0, 8:] = 0
    codes = pitch_codes(f0, voiced, 4)
    assert codes[0, :2, 2:].eq(0).all()  # unvoiced shares code 0
    assert codes[0, 2].tolist() == [15, 15, 0, 0]  # voicing bits, first frame first
    f0_hat, _ = pitch_from_codes(codes, 4, 16)
    torch.testing.assert_close(f0_hat[0, 8:], f0_hat[0, 7:8].expand(8))  # held, not 50 Hz


def test_fill_unvoiced() -> None:
    f0 = torch.tensor([[100.0, 999.0, 400.0, 999.0], [999.0, 999.0, 999.0, 999.0]])
    voiced = torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 0]])
    filled = fill_unvoiced(f0, voiced)
    torch.testing.assert_close(filled[0], torch.tensor([100.0, 200.0, 400.0, 400.0]))
    assert filled[1].eq(filled[1, 0]).all()


def test_side_codebooks_need_an_even_factor() -> None:
    assert side_codebooks(4) == (128, 128, 16) and side_codebooks(2) == (128, 4)
    with pytest.raises(VqkitError, match="divisible by 2"):
        side_codebooks(3)


def test_envelope_frontend_from_config_and_synthesiser_choice() -> None:
    config = load_config(None, ["features.kind='envelope'", "features.rate_k=30"])
    frontend = make_frontend(config.features, RATE)
    assert isinstance(frontend, EnvelopeFrontend) and frontend.n_bins == 30
    assert frontend(torch.zeros(RATE // 10)).shape == (1, 30, 1 + RATE // 10 // 128)
    with pytest.raises(VqkitError, match="does not fit these features"):
        make_synthesiser(config.codec, frontend)  # griffinlim cannot invert an envelope
    harmonic = load_config(None, ["features.kind='envelope'", "codec.synthesis='harmonic'"])
    assert isinstance(make_synthesiser(harmonic.codec, frontend), HarmonicNoise)
    with pytest.raises(VqkitError, match="Griffin-Lim iterations"):
        make_synthesiser(harmonic.codec, frontend, iters=8)
    stft = make_frontend(load_config(None, []).features, RATE)
    with pytest.raises(VqkitError, match="does not fit these features"):
        make_synthesiser(harmonic.codec, stft)


# The codec with a tiny random-weight parametric model (no training needed).


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory, speech: np.ndarray) -> Path:
    """A random-weight parametric model, its codebooks k-means initialised on the envelope of
    ``speech`` by one training-mode pass, so its codes vary."""
    config = tiny_parametric_config()
    envelope = make_frontend(config.features, CODEC_RATE)(torch.from_numpy(speech)[None])
    path = tmp_path_factory.mktemp("parametric") / "tiny.safetensors"
    return save_random_codec(path, config, K, mean=-20.0, std=15.0, kmeans_on=envelope)


def test_bitrate_counts_pitch_and_voicing(model_path: Path, speech: np.ndarray) -> None:
    codec = load_codec(model_path, beam=1)  # greedy: the random model's envelope codes vary
    frame_rate = CODEC_RATE / 80 / 4  # 25 code frames/s: 6 bits a stage, 7 + 7 + 4 side bits
    assert codec.bitrates == pytest.approx([frame_rate * (6 * q + 18) / 1000 for q in (1, 2, 3, 4)])
    encoded = codec.encode(speech, CODEC_RATE, bitrate=codec.bitrates[1])
    assert encoded.codebook_sizes == (128, 128, 16, 64, 64)
    payload_kbps = encoded.payload_size() * 8 / encoded.duration / 1000
    assert payload_kbps == pytest.approx(codec.bitrates[1], rel=0.03)
    voicing = encoded.codes[2]
    assert 15 in voicing and (voicing < 15).any()  # voiced frames, and the silent edges not
    assert len(np.unique(encoded.codes[0])) >= 3  # the pitch codes follow its three tones
    assert len(np.unique(encoded.codes[3])) > 3


@pytest.mark.parametrize("side_coding", ["separate", "joint"])
def test_chunked_codec_equals_whole(model_path: Path, speech: np.ndarray, side_coding: str) -> None:
    checkpoint = load_checkpoint(model_path)
    config = replace(checkpoint.config, codec={"side_coding": side_coding})
    checkpoint = dataclasses.replace(checkpoint, config=config)
    chunked, whole = Codec(checkpoint, chunk_seconds=0.16), Codec(checkpoint, chunk_seconds=1e6)
    encoded = whole.encode(speech, CODEC_RATE)
    in_chunks = chunked.encode(speech, CODEC_RATE)
    # The same codes, or (a random model's k-means codebook has duplicate entries) the same vectors
    n_side = len(whole.side)
    np.testing.assert_array_equal(in_chunks.codes[:n_side], encoded.codes[:n_side])
    for row, frame in np.argwhere(in_chunks.codes != encoded.codes):
        vectors = whole.model.bottleneck.stages[row - n_side].codebook.vectors
        pair = vectors[[in_chunks.codes[row, frame], encoded.codes[row, frame]]]
        torch.testing.assert_close(pair[0], pair[1], atol=1e-5, rtol=0)
    assert in_chunks.gain_db == encoded.gain_db  # the level correction sums over chunks
    wave_whole, wave_chunked = whole.decode(encoded), chunked.decode(encoded)
    assert wave_whole.shape == wave_chunked.shape == speech.shape
    # Chunks are crossfaded over a few frames: the audio matches away from the joins.
    assert np.corrcoef(wave_whole, wave_chunked)[0, 1] > 0.9


def test_cli_round_trip_and_oracle(
    tmp_path: Path, model_path: Path, speech: np.ndarray, capsys: pytest.CaptureFixture
) -> None:
    sf.write(tmp_path / "in.wav", speech, 16000, subtype="PCM_16")  # resampled to 8 kHz
    assert (
        main(
            [
                "encode",
                str(tmp_path / "in.wav"),
                str(tmp_path / "x.vqc"),
                "--model",
                str(model_path),
                "--bitrate",
                "0.6",
            ]
        )
        == 0
    )
    assert "1 stages" in capsys.readouterr().out
    assert (
        main(
            [
                "decode",
                str(tmp_path / "x.vqc"),
                str(tmp_path / "out.wav"),
                "--model",
                str(model_path),
            ]
        )
        == 0
    )
    assert "1 stages decoded" in capsys.readouterr().out
    out, rate = sf.read(tmp_path / "out.wav")
    assert (len(out), rate) == (len(speech), 16000) and np.abs(out).max() > 0.01
    oracle = Oracle(load_codec(model_path))
    assert oracle.name == "oracle-harmonic"
    result = oracle.run(speech, CODEC_RATE)
    assert result.wave.shape == speech.shape and result.sample_rate == CODEC_RATE


def test_a_spectrogram_model_refuses_parametric_codes(
    tmp_path: Path, model_path: Path, speech: np.ndarray
) -> None:
    """With the same id, rate and hop, a model without pitch rows still refuses the file."""
    encoded = load_codec(model_path).encode(speech, CODEC_RATE, bitrate=0.6)
    spectrogram = Codec(load_checkpoint(model_path))
    spectrogram.parametric = False  # how a spectrogram model reads the rows
    with pytest.raises(VqkitError, match="does not fit its model"):
        spectrogram._check_encoded(encoded)


def test_recipe_prepares_trains_and_codes_end_to_end(
    tiny_speech_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The shipped recipe, scaled down: prepare envelope features, train, encode and decode."""
    config = load_config(
        RECIPES / "speech_parametric.toml",
        [
            f"audio.sample_rate={CODEC_RATE}",
            "features.n_fft=256",
            "features.win_length=160",
            "features.hop_length=80",
            f"features.rate_k={K}",
            "model.hidden=32",
            "model.latent_dim=16",
            "model.n_res_blocks=1",
            "bottleneck.n_codebooks=3",
            "bottleneck.codebook_size=16",
            "train.steps=20",
            "train.batch_size=4",
            "train.segment_frames=32",
            "train.warmup_steps=2",
            "train.eval_every=10",
            "train.checkpoint_every=10",
            "train.log_every=10",
            "data.val_fraction=0.25",
            "data.test_fraction=0.25",
        ],
    )
    summary = prepare(tiny_speech_dir, tmp_path / "cache", config, workers=1)
    assert summary.n_ok == 12
    cache = FeatureCache(tmp_path / "cache")
    assert cache.load(cache.items("train")[0]).shape[0] == K
    train(config, data=tmp_path / "cache", run=tmp_path / "run")
    clip = sorted(tiny_speech_dir.rglob("*.wav"))[0]
    code_file, out = tmp_path / "x.vqc", tmp_path / "out.wav"
    assert main(["encode", str(clip), str(code_file), "--model", str(tmp_path / "run")]) == 0
    assert main(["decode", str(code_file), str(out), "--model", str(tmp_path / "run")]) == 0
    assert "3 stages decoded" in capsys.readouterr().out
    assert sf.info(str(out)).frames == sf.info(str(clip)).frames
    # scripts/finetune_synthesis.py: a few end-to-end steps through the synthesiser, then resumed
    finetune_synthesis = load_script("finetune_synthesis")
    tuned = tmp_path / "tuned.safetensors"
    args = [str(tmp_path / "run"), str(tmp_path / "cache"), str(tiny_speech_dir), str(tuned)]
    options = ["--batch", "2", "--seconds", "0.3", "--save-every", "2"]
    assert finetune_synthesis.main([*args, *options, "--steps", "2"]) == 0
    assert finetune_synthesis.main([*args, *options, "--steps", "3"]) == 0
    assert "after 3 steps" in capsys.readouterr().out
    before, after = load_checkpoint(resolve_model(tmp_path / "run")), load_checkpoint(tuned)
    assert after.meta["finetune_step"] == 3
    changed = [
        name
        for name, weight in after.model.state_dict().items()
        if not torch.equal(weight, before.model.state_dict()[name])
    ]
    assert changed and all(name.startswith("decoder.") for name in changed)


def test_joint_side_coding_fits_a_stage_more_and_old_files_decode_as_before(
    model_path: Path, speech: np.ndarray
) -> None:
    checkpoint = load_checkpoint(model_path)
    separate = Codec(checkpoint)
    config = replace(checkpoint.config, codec={"side_coding": "joint"})
    joint = Codec(dataclasses.replace(checkpoint, config=config))
    assert load_checkpoint(model_path).model_id == checkpoint.model_id  # the key is not hashed
    frame_rate = CODEC_RATE / 80 / 4  # 25 code frames/s: 6 bits a stage, 11 side bits
    assert joint.bitrates == pytest.approx([frame_rate * (6 * q + 11) / 1000 for q in (1, 2, 3, 4)])
    encoded = joint.encode(speech, CODEC_RATE, bitrate=joint.bitrates[2])
    assert encoded.codebook_sizes == (1921, 64, 64, 64)
    payload_kbps = encoded.payload_size() * 8 / encoded.duration / 1000
    assert payload_kbps == pytest.approx(joint.bitrates[2], rel=0.03)
    for coded in (encoded, separate.encode(speech, CODEC_RATE, bitrate=separate.bitrates[2])):
        # either codec decodes either file, the same way, whatever its own setting
        np.testing.assert_array_equal(separate.decode(coded), joint.decode(coded))
    assert np.abs(joint.decode(encoded)).max() > 0.01


def test_the_search_beam_steers_only_the_encoder(model_path: Path, speech: np.ndarray) -> None:
    """``codec.beam`` changes the codes (not their count) and keeps the model id; a file decodes
    the same whatever the decoding codec's beam."""
    checkpoint = load_checkpoint(model_path)
    greedy_config = replace(checkpoint.config, codec={"beam": 1})
    greedy = Codec(dataclasses.replace(checkpoint, config=greedy_config))
    searched = Codec(checkpoint)
    assert checkpoint.config.codec.beam > 1 and greedy.model_id == searched.model_id
    a = greedy.encode(speech, CODEC_RATE, bitrate=greedy.bitrates[2])
    b = searched.encode(speech, CODEC_RATE, bitrate=greedy.bitrates[2])
    assert a.codes.shape == b.codes.shape and (a.codes != b.codes).any()
    np.testing.assert_array_equal(greedy.decode(b), searched.decode(b))


def test_the_pitch_method_steers_only_the_encoder(
    model_path: Path, speech: np.ndarray, tmp_path: Path
) -> None:
    """Switching ``features.pitch`` keeps the model id, and either codec decodes either's files
    the same way (a shipped model changes its tracker without orphaning its files)."""
    checkpoint = load_checkpoint(model_path)
    codecs = []
    for method in PITCH_METHODS:
        config = replace(checkpoint.config, features={"pitch": method})
        path = tmp_path / f"{method}.safetensors"
        save_checkpoint(
            path, checkpoint.model, config, tensors=checkpoint.tensors, meta=checkpoint.meta
        )
        assert load_checkpoint(path).model_id == checkpoint.model_id
        codecs.append(load_codec(path))
    for coded in (codec.encode(speech, CODEC_RATE) for codec in codecs):
        np.testing.assert_array_equal(codecs[0].decode(coded), codecs[1].decode(coded))


def test_the_decoder_undoes_the_level_the_coded_envelope_loses(
    model_path: Path, speech: np.ndarray
) -> None:
    """The random model decodes an envelope about 23 dB too quiet; the file's gain restores it."""
    codec = load_codec(model_path)
    encoded = codec.encode(speech, CODEC_RATE, bitrate=codec.bitrates[1])
    assert codec.config.codec.level_db == 0 and encoded.gain_db < -10
    level = active_level_db(speech, CODEC_RATE)
    assert abs(active_level_db(codec.decode(encoded), CODEC_RATE) - level) < 1.0
    uncorrected = codec.decode(dataclasses.replace(encoded, gain_db=0))
    assert active_level_db(uncorrected, CODEC_RATE) - level < -10
