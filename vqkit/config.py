"""Typed configuration: frozen dataclasses loaded from TOML, overridden by ``section.key=value``.

One word per concept: the TOML key, the ``--set`` flag, the constructor argument and the code-file
header all use the same name. Unknown keys and wrong types raise :class:`VqkitError` naming the
nearest valid key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vqkit.errors import VqkitError, shown

# The enumerated values, each defined once: the modules that dispatch on them list their choices
# with :func:`choices`, and loading a config checks them (a typo names the valid values).
PadSide = Literal["right", "left"]
PadMode = Literal["constant", "reflect"]  # zeros | reflection
FeatureKind = Literal["stft", "mel", "ratek", "envelope", "image"]
PitchMethod = Literal["yin", "tracked"]  # envelope: vqkit.audio.pitch
Normalise = Literal["none", "minmax", "minmax_sym", "meanstd"]
SpeechLayout = Literal["auto", "folder", "fsdd", "l2arctic", "speechcommands", "ljspeech"]
ImageLayout = Literal["cifar10", "mnist-idx", "image-folder", "sklearn-digits"]
Layout = Literal[SpeechLayout, ImageLayout]
ModelKind = Literal["conv1d", "conv2d", "convlist"]
BottleneckKind = Literal["identity", "gaussian", "vq", "rvq", "fsq"]
ReconLoss = Literal["mse", "l1", "l1+mse"]
Device = Literal["auto", "cpu", "cuda"]
Synthesis = Literal["griffinlim", "harmonic"]


def choices(tp: Any) -> tuple[str, ...]:
    """The values of a ``Literal`` type (nested ones flattened), in order."""
    values: list[str] = []
    for arg in typing.get_args(tp):
        values += choices(arg) if typing.get_origin(arg) is Literal else [arg]
    return tuple(values)


@dataclass(frozen=True)
class AudioConfig:
    """How audio is read before feature extraction."""

    sample_rate: int = 16000
    duration: float = 0.0  # seconds; 0 keeps each file's own length
    pad_side: PadSide = "right"
    pad_mode: PadMode = "constant"


@dataclass(frozen=True)
class FeatureConfig:
    """The spectral front end (see :mod:`vqkit.audio.frontends`)."""

    # stft (log-magnitude dB) | mel (log-mel dB) | ratek (Codec 2 rate-K) | image
    # | envelope (pitch-adaptive envelope at rate_k points, F0 and voicing: vqkit.audio.envelope)
    kind: FeatureKind = "stft"
    n_fft: int = 512
    hop_length: int = 128
    win_length: int = 0  # 0 means n_fft
    n_mels: int = 80
    fmin: float = 0.0
    fmax: float = 0.0  # 0 means sample_rate / 2
    rate_k: int = 20  # number of rate-K envelope samples
    # envelope: F0 and voicing by YIN's first dip ("yin") or candidates tracked over a few frames
    pitch: PitchMethod = "tracked"
    normalise: Normalise = "meanstd"


@dataclass(frozen=True)
class DataConfig:
    """Corpus layout, subsets and the split."""

    layout: Layout = "auto"
    speakers: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    max_per_speaker: int = 0  # 0 means no limit
    speaker_disjoint: bool = False
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0


@dataclass(frozen=True)
class ModelConfig:
    """Encoder and decoder (see :mod:`vqkit.nn.model`)."""

    kind: ModelKind = "conv1d"  # conv1d (bins as channels) | conv2d (an image) | convlist
    hidden: int = 128
    latent_dim: int = 64
    n_res_blocks: int = 2
    downsample: int = 4  # conv1d: time decimation; conv2d: spatial factor (power of 2)
    filters: tuple[int, ...] = (32, 64)  # convlist
    kernels: tuple[int, ...] = (3, 3)  # convlist
    strides: tuple[int, ...] = (2, 2)  # convlist
    dense_dim: int = 0  # convlist: > 0 adds a dense bottleneck of this size
    # conv1d, for real-time coding: how far the encoder looks past a code frame's last feature
    # frame, and the decoder past a code frame, in those frames; >= 0 makes every conv causal
    # (padded on the left) and shifts the input by that much; -1: centred convs, no limit
    encoder_lookahead: int = -1
    decoder_lookahead: int = -1


@dataclass(frozen=True)
class BottleneckConfig:
    """The latent bottleneck (see :mod:`vqkit.nn.bottleneck`)."""

    kind: BottleneckKind = "vq"  # identity (AE) | gaussian (VAE) | vq | rvq | fsq
    codebook_size: int = 512
    codebook_dim: int = 0  # 0 means latent_dim; smaller projects to a low-dimensional lookup
    n_codebooks: int = 1
    beta: float = 0.25  # commitment weight
    ema: bool = True
    decay: float = 0.99
    kmeans_init: bool = True
    kmeans_iters: int = 10  # Lloyd iterations of the k-means initialisation
    dead_threshold: float = 2.0  # codes used fewer times than this per window are re-seeded
    dead_window: int = 100  # training batches per dead-code window; 0 disables re-seeding
    l2_normalize: bool = False
    quantizer_dropout: float = 0.0  # probability of training a batch on fewer residual stages
    fsq_levels: tuple[int, ...] = (8, 5, 5, 5)
    kl_weight: float = 1.0  # VAE loss weight of the KL, itself a mean over latent elements


@dataclass(frozen=True)
class TrainConfig:
    """The training loop (see :mod:`vqkit.train.loop`)."""

    steps: int = 2000
    batch_size: int = 16
    segment_frames: int = 128  # random crop length in frames; 0 uses whole (padded) items
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0
    recon_loss: ReconLoss = "mse"
    augment: float = 0.0  # share of segments through a random channel (vqkit.data.augment)
    augment_reverb: float = 0.0  # share of segments in a random light room
    augment_noise: float = 0.0  # share of segments with stationary noise added
    augment_warp: float = 0.0  # share of segments with their frequencies scaled (another speaker)
    high_band_weight: float = 1.0  # loss weight of feature rows above band_split_hz (audio)
    band_split_hz: float = 4000.0
    loudness_weight: float = 0.0  # loss weight (P / P_max)^g by the true power P (audio), g = this
    overshoot_weight: float = 1.0  # loss weight of errors where the output is above the truth
    log_every: int = 50
    eval_every: int = 500
    checkpoint_every: int = 500
    eval_batches: int = 20
    seed: int = 0
    device: Device = "auto"
    threads: int = 0  # 0 leaves torch's default


@dataclass(frozen=True)
class CodecConfig:
    """Encoding to and decoding from ``.vqc`` files (see :mod:`vqkit.codec.codec`)."""

    synthesis: Synthesis = "griffinlim"  # griffinlim (stft, mel) | harmonic (envelope)
    gl_iters: int = 32
    gl_momentum: float = 0.99
    chunk_seconds: float = 20.0
    level_db: float = 0.0  # RMS level (dBFS) input is scaled to before encoding; 0 keeps it as is
    # Post-filter: decoded dB spectra are stretched about each frame's mean by this factor before
    # synthesis, undoing some of the decoder's over-smoothing; 1 turns it off.
    postfilter: float = 1.0
    noise_voiced: float = 0.03  # harmonic: noise gain in voiced frames (1 in unvoiced ones)
    # harmonic: how encoding codes pitch and voicing (vqkit.codec.side): separate (18 bits per
    # 40 ms) | joint (11 bits). Decoding reads either from the file's rows, so this key does not
    # enter the model id.
    side_coding: str = "separate"
    # Encoding with a residual VQ: the paths its search keeps through the stages (1: greedy, each
    # stage its nearest code, as in training). More find a closer latent for the same bits, at
    # about 0.001 x real time a path (12 stages, one thread); decoding is unchanged, so this key
    # does not enter the model id either.
    beam: int = 4


@dataclass(frozen=True)
class Config:
    """A whole recipe. Every section has defaults, so a TOML file names only what it changes."""

    audio: AudioConfig = field(default_factory=AudioConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    bottleneck: BottleneckConfig = field(default_factory=BottleneckConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)


INF = math.inf
# The valid range of every number in a config, checked as it loads (each list item alike): a zero
# batch, a NaN learning rate or a codebook of 10**9 entries is a typo, refused with the key and
# its range before anything is built. Sizes have ceilings far above any sensible model; what the
# machine can hold is checked when the model is built (vqkit.limits).
RANGES: dict[str, tuple[float, float]] = {
    "audio.sample_rate": (4000, 384_000),  # vqkit.audio's MIN_SAMPLE_RATE..MAX_SAMPLE_RATE
    "audio.duration": (0, 86_400),
    "features.n_fft": (2, 65536),
    "features.hop_length": (1, 65536),
    "features.win_length": (0, 65536),
    "features.n_mels": (1, 4096),
    "features.fmin": (0, 384_000),
    "features.fmax": (0, 384_000),
    "features.rate_k": (1, 4096),
    "data.max_per_speaker": (0, INF),
    "data.val_fraction": (0, 1),
    "data.test_fraction": (0, 1),
    "data.seed": (0, 2**63 - 1),
    "model.hidden": (1, 65536),
    "model.latent_dim": (1, 65536),
    "model.n_res_blocks": (0, 1024),
    "model.downsample": (1, 65536),
    "model.filters": (1, 65536),
    "model.kernels": (1, 1024),
    "model.strides": (1, 1024),
    "model.dense_dim": (0, 2**20),
    "model.encoder_lookahead": (-1, 65536),
    "model.decoder_lookahead": (-1, 65536),
    "bottleneck.codebook_size": (1, 65536),  # the code file's limit too
    "bottleneck.codebook_dim": (0, 65536),
    "bottleneck.n_codebooks": (1, 1024),
    "bottleneck.beta": (0, INF),
    "bottleneck.decay": (0, 1),
    "bottleneck.kmeans_iters": (0, 10_000),
    "bottleneck.dead_threshold": (0, INF),
    "bottleneck.dead_window": (0, INF),
    "bottleneck.quantizer_dropout": (0, 1),
    "bottleneck.fsq_levels": (2, 65536),
    "bottleneck.kl_weight": (0, INF),
    "train.steps": (1, INF),
    "train.batch_size": (1, 65536),
    "train.segment_frames": (0, 2**20),
    "train.lr": (1e-12, 10),
    "train.weight_decay": (0, INF),
    "train.augment": (0, 1),
    "train.augment_reverb": (0, 1),
    "train.augment_noise": (0, 1),
    "train.augment_warp": (0, 1),
    "train.high_band_weight": (0, INF),
    "train.band_split_hz": (0, INF),
    "train.loudness_weight": (0, 10),
    "train.overshoot_weight": (0, INF),
    "train.warmup_steps": (0, INF),
    "train.grad_clip": (0, INF),
    "train.log_every": (1, INF),
    "train.eval_every": (1, INF),
    "train.checkpoint_every": (1, INF),
    "train.eval_batches": (1, INF),
    "train.seed": (0, 2**63 - 1),
    "train.threads": (0, 1024),  # 0 leaves torch's default; vqkit.limits checks the machine's
    "codec.gl_iters": (0, 10_000),
    "codec.gl_momentum": (0, 1),
    "codec.chunk_seconds": (0.01, 86_400),
    "codec.level_db": (-120, 0),
    "codec.postfilter": (0, 10),
    "codec.noise_voiced": (0, 1),
    "codec.beam": (1, 1024),
}


def _check_range(value: Any, where: str) -> None:
    """Raise :class:`VqkitError` unless ``value`` (a number, or each item of a list) is finite
    and inside ``RANGES[where]``; the message names the key and the range."""
    low, high = RANGES.get(where, (-INF, INF))
    for v in value if isinstance(value, tuple) else (value,):
        if isinstance(v, bool) or not isinstance(v, int | float):
            continue
        if not math.isfinite(v) or not low <= v <= high:
            valid = f">= {low:g}" if high == INF else f"{low:g}..{high:g}"
            shown = value if not isinstance(value, tuple) else list(value)
            raise VqkitError(f"{where} must be {valid} (a finite number), got {shown!r}")


def check_value(key: str, value: float, name: str | None = None) -> None:
    """Check a value given elsewhere (a command-line option, say) against ``RANGES[key]``; the
    message calls it ``name`` (default: ``key``)."""
    try:
        _check_range(value, key)
    except VqkitError as e:
        raise VqkitError(str(e).replace(key, name or key, 1)) from None


def _check_sums(config: Config) -> None:
    """Cross-key rules: the held-out fractions leave something to train on; augmentations only
    on dB features whose normalisation has no per-item range; band weights only on audio."""
    data, features = config.data, config.features
    if data.val_fraction + data.test_fraction >= 1:
        raise VqkitError(
            f"data.val_fraction + data.test_fraction must be below 1, got "
            f"{data.val_fraction:g} + {data.test_fraction:g}"
        )
    spectral = features.kind != "image" and features.normalise in ("none", "meanstd")
    for key in ("augment", "augment_reverb", "augment_noise", "augment_warp", "loudness_weight"):
        if getattr(config.train, key) > 0 and not spectral:
            raise VqkitError(
                f"train.{key} needs spectral features normalised 'none' or 'meanstd', got "
                f"features.kind = '{features.kind}', features.normalise = '{features.normalise}'"
            )
    if config.train.high_band_weight != 1 and features.kind == "image":
        raise VqkitError("train.high_band_weight needs audio features; images have no frequencies")


def _suggest(name: str, options: list[str]) -> str:
    near = difflib.get_close_matches(name, options, n=1)
    return f"; did you mean '{near[0]}'?" if near else f"; valid: {', '.join(options)}"


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (int, float, str, bool, a ``Literal`` of
    strings or tuple[X, ...])."""
    if typing.get_origin(tp) is Literal:
        options = choices(tp)
        if not isinstance(value, str):
            raise VqkitError(f"{where} must be str (one of {', '.join(options)}), got {value!r}")
        if value not in options:
            near = difflib.get_close_matches(str(value), options, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise VqkitError(f"{where} must be one of {', '.join(options)}, got {value!r}{hint}")
        return value
    if typing.get_origin(tp) is tuple:
        (item,) = {a for a in typing.get_args(tp) if a is not Ellipsis}
        if not isinstance(value, list | tuple):
            raise VqkitError(f"{where} must be a list of {item.__name__}, got {shown(repr(value))}")
        return tuple(_coerce(v, item, where) for v in value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is not bool and isinstance(value, bool) or not isinstance(value, tp):
        raise VqkitError(f"{where} must be {tp.__name__}, got {shown(repr(value))}")
    return value


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        if key not in hints:
            raise VqkitError(f"unknown config key '{shown(path)}'{_suggest(key, names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                got = shown(repr(value))
                raise VqkitError(f"config section '{shown(path)}' must be a table, got {got}")
            kwargs[key] = _build(tp, value, path)
        else:
            kwargs[key] = _coerce(value, tp, path)
            _check_range(kwargs[key], path)
    return cls(**kwargs)


def config_from_dict(values: dict[str, Any]) -> Config:
    """Build a :class:`Config` from nested dicts, strictly: types, then ranges (:data:`RANGES`)."""
    config = _build(Config, values, "")
    _check_sums(config)
    return config


# Keys added after configs were first saved, with the value every config saved before them (a
# checkpoint's, a cache's) was made with: a saved config without one reads as that value.
SAVED_BEFORE: dict[tuple[str, str], Any] = {
    ("model", "encoder_lookahead"): -1,
    ("model", "decoder_lookahead"): -1,
    ("train", "augment"): 0.0,
    ("train", "augment_reverb"): 0.0,
    ("train", "augment_noise"): 0.0,
    ("train", "augment_warp"): 0.0,
    ("train", "high_band_weight"): 1.0,
    ("train", "band_split_hz"): 4000.0,
    ("train", "loudness_weight"): 0.0,
    ("train", "overshoot_weight"): 1.0,
    ("features", "pitch"): "yin",
}


def saved_config_from_dict(values: dict[str, Any]) -> Config:
    """:func:`config_from_dict` of a config vqkit saved, the keys it predates at the values it was
    made with (:data:`SAVED_BEFORE`)."""
    values = {k: dict(v) if isinstance(v, dict) else v for k, v in values.items()}
    for (section, key), before in SAVED_BEFORE.items():
        if isinstance(values.get(section), dict):
            values[section].setdefault(key, before)
    return config_from_dict(values)


def config_to_dict(config: Config) -> dict[str, Any]:
    """The resolved config as plain nested dicts (tuples become lists), for JSON and TOML."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return list(v) if isinstance(v, tuple) else v

    return plain(dataclasses.asdict(config))


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value``; the value is read as TOML, else taken as a bare string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise VqkitError(f"--set expects section.key=value, got '{text}'")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip().split("."), value


def merge_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``values`` with every ``section.key=value`` override applied."""
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in values.items()}
    for text in overrides:
        keys, value = parse_override(text)
        if len(keys) != 2:
            raise VqkitError(f"--set expects section.key=value, got '{text}'")
        section, key = keys
        if not isinstance(merged.setdefault(section, {}), dict):
            raise VqkitError(f"config section '{section}' must be a table")
        merged[section][key] = value
    return merged


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Load a TOML recipe (or the defaults when ``path`` is None) and apply overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            values = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise VqkitError(f"config file {path} does not exist") from None
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise VqkitError(f"cannot read config {path}: {e}") from None
    merged = merge_overrides(values, list(overrides))
    try:
        return config_from_dict(merged)
    except VqkitError as e:
        if path is None:
            raise
        where = f"{path} (with --set overrides)" if overrides else str(path)
        raise VqkitError(f"{where}: {e}") from None


def replace(config: Config, **sections: dict[str, Any]) -> Config:
    """A copy of ``config`` with some keys of some sections changed (checked like a TOML file)."""
    values = config_to_dict(config)
    for name, changes in sections.items():
        values[name] = {**values[name], **changes}
    return config_from_dict(values)
