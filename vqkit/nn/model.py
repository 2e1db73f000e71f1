"""Encoders, decoders and the :class:`Autoencoder` that composes them with a bottleneck.

Three encoder/decoder families (``model.kind``):

- ``conv1d``: spectrogram bins as channels, convolution over time, ``log2(downsample)`` stride-2
  stages then residual blocks (the VQ-VAE layout in 1-D).
- ``conv2d``: the VQ-VAE paper's layout (stride-2 4x4 convs, residual blocks) on images, or on a
  spectrogram seen as a one-channel image.
- ``convlist``: a configurable list of conv layers (filters, kernels, strides; ReLU and batch norm
  after each), optionally with a dense bottleneck (flatten -> linear -> one latent vector), which
  needs a fixed input size.

The autoencoder pads its input to a multiple of the total stride and crops the decoder output back,
so ``x_hat`` always has the shape of ``x``, odd lengths included.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vqkit.config import Config, ModelConfig, ModelKind, choices
from vqkit.errors import VqkitError
from vqkit.limits import check_memory
from vqkit.nn.blocks import (
    CausalConv1d,
    CausalConvTranspose1d,
    advance,
    batch_norm,
    conv,
    conv3,
    conv_transpose,
    crop,
    exact_padding,
    pad_to_multiple,
    residual_stack,
)
from vqkit.nn.bottleneck import Bottleneck, BottleneckOutput, Gaussian, build_bottleneck
from vqkit.nn.normalise import Normaliser

KINDS = choices(ModelKind)


def _as_image(x: Tensor, add_channel: bool) -> Tensor:
    return x.unsqueeze(1) if add_channel else x


def _from_image(x: Tensor, add_channel: bool) -> Tensor:
    return x.squeeze(1) if add_channel else x


class ConvEncoder(nn.Module):
    """The VQ-VAE encoder: ``log2(downsample)`` stride-2 4-wide convs, a 3-wide conv, residual
    blocks, and a 1x1 conv to ``latent_dim``.

    Shapes: ``(B, in_channels, *S) -> (B, latent_dim, *S / downsample)`` with every axis of ``S``
    a multiple of ``downsample`` (``add_channel``: ``(B, H, W)`` is taken as ``(B, 1, H, W)``).
    In 2-D the stages widen ``hidden / 2^k -> hidden`` as in the paper; in 1-D the input already
    has many channels (frequency bins), so every stage has ``hidden``.
    """

    def __init__(
        self,
        in_channels: int,
        config: ModelConfig,
        dims: int,
        add_channel: bool = False,
    ) -> None:
        super().__init__()
        self.dims, self.add_channel = dims, add_channel
        self.downsample = self.multiple = config.downsample
        self.lookahead = _lookahead(config.encoder_lookahead, dims, "encoder")
        causal = self.lookahead is not None
        widths = _stage_widths(config.hidden, _n_stages(config.downsample), dims)
        layers: list[nn.Module] = []
        channels = in_channels
        for width in widths:
            if causal:
                layers += [CausalConv1d(channels, width, 4, 2), nn.ReLU()]
            else:
                layers += [conv(dims, channels, width, 4, stride=2, padding=1), nn.ReLU()]
            channels = width
        layers += [
            conv3(dims, channels, config.hidden, causal),
            residual_stack(config.hidden, config.hidden, config.n_res_blocks, dims, causal),
            conv(dims, config.hidden, config.latent_dim, 1),
        ]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if self.lookahead is not None:
            x = advance(x, self.lookahead)
        return self.net(_as_image(x, self.add_channel))

    def latent_size(self, size: Sequence[int]) -> tuple[int, ...]:
        """Latent spatial size for an input of spatial size ``size``."""
        return tuple(math.ceil(s / self.downsample) for s in size)


class ConvDecoder(nn.Module):
    """The mirror of :class:`ConvEncoder`: ``(B, latent_dim, *S') -> (B, out_channels, *S'*f)``."""

    def __init__(
        self,
        out_channels: int,
        config: ModelConfig,
        dims: int,
        add_channel: bool = False,
    ) -> None:
        super().__init__()
        self.add_channel = add_channel
        self.lookahead = _lookahead(config.decoder_lookahead, dims, "decoder")
        causal = self.lookahead is not None
        widths = _stage_widths(config.hidden, _n_stages(config.downsample), dims)
        layers: list[nn.Module] = [
            conv3(dims, config.latent_dim, config.hidden, causal),
            residual_stack(config.hidden, config.hidden, config.n_res_blocks, dims, causal),
        ]
        channels = config.hidden
        for i in reversed(range(len(widths))):
            width = widths[i - 1] if i > 0 else out_channels
            if causal:
                layers.append(CausalConvTranspose1d(channels, width, 4, 2))
            else:
                layers.append(conv_transpose(dims, channels, width, 4, stride=2, padding=1))
            if i > 0:
                layers.append(nn.ReLU())
            channels = width
        if not widths:
            layers.append(conv3(dims, channels, out_channels, causal))
        self.net = nn.Sequential(*layers)

    def forward(self, z_q: Tensor) -> Tensor:
        if self.lookahead is not None:
            z_q = advance(z_q, self.lookahead)
        return _from_image(self.net(z_q), self.add_channel)


def _lookahead(frames: int, dims: int, which: str) -> int | None:
    """None for centred convs (``-1``), else the frames a causal 1-D net looks ahead."""
    if frames == -1:
        return None
    if frames < 0 or dims != 1:
        raise VqkitError(
            f"model.{which}_lookahead must be -1 (no limit) or >= 0 frames with kind conv1d, "
            f"got {frames}"
        )
    return frames


def _n_stages(downsample: int) -> int:
    if downsample < 1 or downsample & (downsample - 1):
        raise VqkitError(f"model.downsample must be a power of 2, got {downsample}")
    return downsample.bit_length() - 1


def _stage_widths(hidden: int, n: int, dims: int) -> list[int]:
    if dims == 1:
        return [hidden] * n
    return [max(1, hidden // 2 ** (n - 1 - i)) for i in range(n)]


def _check_convlist(config: ModelConfig) -> None:
    lists = (config.filters, config.kernels, config.strides)
    if not config.filters or len({len(v) for v in lists}) != 1:
        raise VqkitError(
            "model.filters, model.kernels and model.strides must be non-empty lists of one "
            f"length, got {[list(v) for v in lists]}"
        )
    if min(config.filters) < 1 or config.dense_dim < 0:
        raise VqkitError("model.filters must be >= 1 and model.dense_dim >= 0")
    for kernel, stride in zip(config.kernels, config.strides, strict=True):
        exact_padding(kernel, stride)  # raises on a layer that cannot keep exact lengths


class ConvListEncoder(nn.Module):
    """2-D conv layers from ``model.filters/kernels/strides``, each followed by ReLU and batch norm,
    then a 1x1 conv to ``latent_dim`` or, with ``dense_dim > 0``, flatten and a linear layer.

    Shapes: ``(B, C, H, W) -> (B, latent_dim, H / f, W / f)``, or ``(B, dense_dim, 1, 1)`` for the
    dense variant, whose input must have the fixed ``input_size`` (padded to a multiple of ``f``).
    """

    def __init__(
        self,
        in_channels: int,
        config: ModelConfig,
        input_size: tuple[int, int] | None = None,
        add_channel: bool = False,
    ) -> None:
        super().__init__()
        _check_convlist(config)
        self.dims, self.add_channel, self.dense = 2, add_channel, config.dense_dim > 0
        self.multiple = self.downsample = math.prod(config.strides)
        layers: list[nn.Module] = []
        channels = in_channels
        for width, kernel, stride in zip(
            config.filters, config.kernels, config.strides, strict=True
        ):
            padding = exact_padding(kernel, stride)[0]
            layers += [nn.Conv2d(channels, width, kernel, stride, padding), nn.ReLU()]
            layers.append(batch_norm(2, width))
            channels = width
        self.convs = nn.Sequential(*layers)
        if not self.dense:
            self.project = nn.Conv2d(channels, config.latent_dim, 1)
            return
        if input_size is None:
            raise VqkitError("model.dense_dim > 0 needs a fixed input size (train.segment_frames)")
        self.input_size = tuple(input_size)
        self.inner_size = tuple(math.ceil(s / self.multiple) for s in input_size)
        self.downsample = self.inner_size[-1] * self.multiple  # input frames per latent vector
        self.project = nn.Linear(channels * math.prod(self.inner_size), config.dense_dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.convs(_as_image(x, self.add_channel))
        if not self.dense:
            return self.project(h)
        if h.shape[2:] != self.inner_size:
            padded = tuple(s * self.multiple for s in self.inner_size)
            size = tuple(s * self.multiple for s in h.shape[2:])
            raise ValueError(f"expected inputs padded to {padded}, got {size}")
        return self.project(h.flatten(1))[:, :, None, None]

    def latent_size(self, size: Sequence[int]) -> tuple[int, ...]:
        """Latent spatial size for an input of spatial size ``size``."""
        if self.dense:
            return (1, 1)
        return tuple(math.ceil(s / self.multiple) for s in size)


class ConvListDecoder(nn.Module):
    """The mirror of :class:`ConvListEncoder` (transposed convs; the last one has no activation)."""

    def __init__(
        self,
        out_channels: int,
        config: ModelConfig,
        inner_size: tuple[int, int] | None = None,
        add_channel: bool = False,
    ) -> None:
        super().__init__()
        _check_convlist(config)
        self.add_channel, self.inner_size = add_channel, inner_size
        filters, kernels, strides = config.filters, config.kernels, config.strides
        if config.dense_dim > 0:
            assert inner_size is not None, "the dense decoder needs the encoder's inner size"
            self.unproject = nn.Linear(config.dense_dim, filters[-1] * math.prod(inner_size))
        else:
            self.unproject = nn.Conv2d(config.latent_dim, filters[-1], 1)
        layers: list[nn.Module] = []
        for i in reversed(range(len(filters))):
            width = filters[i - 1] if i > 0 else out_channels
            padding, output_padding = exact_padding(kernels[i], strides[i])
            args = (filters[i], width, kernels[i], strides[i], padding, output_padding)
            layers.append(nn.ConvTranspose2d(*args))
            if i > 0:
                layers += [nn.ReLU(), batch_norm(2, width)]
        self.convs = nn.Sequential(*layers)

    def forward(self, z_q: Tensor) -> Tensor:
        if self.inner_size is None:
            h = self.unproject(z_q)
        else:
            h = self.unproject(z_q.flatten(1)).reshape(z_q.shape[0], -1, *self.inner_size)
        return _from_image(self.convs(h), self.add_channel)


@dataclass
class AutoencoderOutput:
    """What :meth:`Autoencoder.forward` returns."""

    x_hat: Tensor  # same shape as x
    z: Tensor  # encoder output before the bottleneck (B, D, *S')
    bottleneck: BottleneckOutput


class Autoencoder(nn.Module):
    """``x -> encoder -> bottleneck -> decoder -> x_hat``, with padding and cropping.

    Inputs are spectrograms ``(B, F, N)`` or images ``(B, C, H, W)``; ``in_shape`` is ``(F,)`` (or
    ``(F, N)`` for a fixed size) or ``(C, H, W)``. ``downsample`` is the factor between input
    frames (or pixels) and latent positions.
    """

    def __init__(
        self,
        encoder: nn.Module,
        bottleneck: Bottleneck,
        decoder: nn.Module,
        in_shape: tuple[int, ...] | None = None,
        normaliser: Normaliser | None = None,
    ) -> None:
        super().__init__()
        self.encoder, self.bottleneck, self.decoder = encoder, bottleneck, decoder
        # How the features the model sees were normalised: not used by forward, but kept in the
        # state dict so that whoever decodes (the codec, the tools) undoes the same statistics.
        self.normaliser = normaliser if normaliser is not None else Normaliser("none")
        self.in_shape = tuple(in_shape) if in_shape is not None else None
        self.dims: int = encoder.dims  # trailing axes of x that are padded and cropped
        self.multiple: int = encoder.multiple
        self.downsample: int = encoder.downsample

    def _encoder_output(self, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        if self.in_shape is not None:
            rank = 4 if len(self.in_shape) == 3 else 3
            if x.dim() != rank or x.shape[1] != self.in_shape[0]:
                names = "(B, {}, H, W)" if rank == 4 else "(B, {}, N)"
                expected = names.format(self.in_shape[0])
                raise ValueError(f"expected x of shape {expected}, got {tuple(x.shape)}")
        size = tuple(x.shape[-self.dims :])
        fixed = self.encoder.input_size if getattr(self.encoder, "dense", False) else size
        if size != fixed:
            raise ValueError(f"this model takes inputs of the fixed size {fixed}, got {size}")
        return self.encoder(pad_to_multiple(x, self.multiple, self.dims)), size

    def forward(self, x: Tensor, n_codebooks: int | None = None) -> AutoencoderOutput:
        """Reconstruct ``x``; ``n_codebooks`` limits a residual VQ to its first stages."""
        z, size = self._encoder_output(x)
        out = self.bottleneck(z, n_codebooks)
        return AutoencoderOutput(crop(self.decoder(out.z_q), size), z, out)

    def encode(self, x: Tensor, n_codebooks: int | None = None, beam: int = 1) -> Tensor:
        """Discrete: codes ``(B, Q, *S')``; continuous: the latent ``(B, D, *S')`` (VAE: mean).
        ``beam``: the paths a residual VQ's search keeps (:meth:`ResidualVQ.quantize`)."""
        return self.bottleneck.quantize(self._encoder_output(x)[0], n_codebooks, beam)

    def decode(self, codes_or_latent: Tensor, length: int | Sequence[int] | None = None) -> Tensor:
        """Decode codes (or a latent) and crop to ``length`` frames, or ``(H, W)`` in 2-D.

        An int in 2-D crops the last axis and the other to the model's height (``F`` for a
        spectrogram, ``H`` from ``in_shape`` for images); None crops only a fixed-size model.
        """
        x_hat = self.decoder(self.bottleneck.dequantize(codes_or_latent))
        return crop(x_hat, self._crop_size(length))

    def _crop_size(self, length: int | Sequence[int] | None) -> tuple[int | None, ...]:
        if length is None and getattr(self.encoder, "dense", False):
            return self.encoder.input_size
        if isinstance(length, Sequence):
            if len(length) != self.dims:
                raise ValueError(f"expected a length of {self.dims} sizes, got {tuple(length)}")
            return tuple(length)
        if self.dims == 1:
            return (length,)
        height = None
        if self.in_shape is not None:
            height = self.in_shape[0] if len(self.in_shape) < 3 else self.in_shape[1]
        return (height, length)

    def latent_shape(self, size: int | Sequence[int]) -> tuple[int, ...]:
        """``(D, *S')``: the latent shape for an input of ``size`` frames (or ``(H, W)``)."""
        full = self._crop_size(size)
        if None in full:
            raise ValueError(f"this model needs the input size (H, W), got {size}")
        return (self.bottleneck.latent_dim, *self.encoder.latent_size(full))

    def sample_latent(
        self, shape: Sequence[int], generator: torch.Generator | None = None
    ) -> Tensor:
        """VAE only: ``z ~ N(0, I)`` of ``shape`` ``(B, D, *S')`` to :meth:`decode`."""
        if not isinstance(self.bottleneck, Gaussian):
            kind = type(self.bottleneck).__name__
            raise VqkitError(f"sampling needs a VAE (bottleneck.kind 'gaussian'); this is {kind}")
        device = next(self.parameters()).device
        return torch.randn(tuple(shape), generator=generator, device=device)


def build_model(config: Config, in_shape: tuple[int, ...]) -> Autoencoder:
    """The autoencoder of ``config.model`` and ``config.bottleneck`` for inputs of ``in_shape``.

    ``in_shape`` is ``(F,)`` for spectrograms ``(B, F, N)`` (``(F, N)`` fixes N), or ``(C, H, W)``
    for images. ``conv2d`` and ``convlist`` see a spectrogram as a one-channel image. The model's
    normaliser is ``config.features.normalise``, "meanstd" statistics zero and one until
    :meth:`~vqkit.nn.normalise.Normaliser.set_statistics` (training) or a checkpoint fills them.
    A model whose training state (weights, gradients, two Adam moments) would not fit in the
    memory available is refused before anything is allocated.
    """
    with torch.device("meta"):  # shapes only: counts what the real model would allocate
        sized = _build_model(config, in_shape)
    tensors = [*sized.parameters(), *sized.buffers()]
    n_bytes = sum(t.numel() * t.element_size() for t in tensors)
    n_params = sum(p.numel() for p in sized.parameters())
    check_memory(
        4 * n_bytes, f"training a model of {n_params:,} parameters (model.*, bottleneck.*)"
    )
    return _build_model(config, in_shape)


def _build_model(config: Config, in_shape: tuple[int, ...]) -> Autoencoder:
    m, in_shape = config.model, tuple(int(s) for s in in_shape)
    if not 1 <= len(in_shape) <= 3 or min(in_shape) < 1:
        raise VqkitError(f"input shape must be (F,), (F, N) or (C, H, W), got {in_shape}")
    image = len(in_shape) == 3
    channels = in_shape[0] if image else 1
    if m.kind == "conv1d":
        if image:
            raise VqkitError("model.kind 'conv1d' needs spectrograms; use conv2d for images")
        encoder, decoder = ConvEncoder(in_shape[0], m, 1), ConvDecoder(in_shape[0], m, 1)
    elif m.kind == "conv2d":
        encoder = ConvEncoder(channels, m, 2, add_channel=not image)
        decoder = ConvDecoder(channels, m, 2, add_channel=not image)
    elif m.kind == "convlist":
        size = _fixed_size(config, in_shape) if m.dense_dim > 0 else None
        encoder = ConvListEncoder(channels, m, size, add_channel=not image)
        inner = encoder.inner_size if encoder.dense else None
        decoder = ConvListDecoder(channels, m, inner, add_channel=not image)
    else:
        raise VqkitError(f"unknown model.kind '{m.kind}'; valid: {', '.join(KINDS)}")
    latent_dim = m.dense_dim if m.kind == "convlist" and m.dense_dim > 0 else m.latent_dim
    bottleneck = build_bottleneck(config.bottleneck, latent_dim)
    return Autoencoder(encoder, bottleneck, decoder, in_shape, _normaliser(config, in_shape))


def _normaliser(config: Config, in_shape: tuple[int, ...]) -> Normaliser:
    kind = "none" if len(in_shape) == 3 else config.features.normalise  # images: [-0.5, 0.5]
    if kind != "meanstd":
        return Normaliser(kind)
    return Normaliser(kind, torch.zeros(in_shape[0]), torch.ones(in_shape[0]))


def _fixed_size(config: Config, in_shape: tuple[int, ...]) -> tuple[int, int]:
    if len(in_shape) >= 2:
        return in_shape[-2], in_shape[-1]
    if config.train.segment_frames <= 0:
        raise VqkitError("model.dense_dim > 0 needs a fixed input size: set train.segment_frames")
    return in_shape[0], config.train.segment_frames
