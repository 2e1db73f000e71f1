"""Normalised training segments of a feature cache, and the normaliser its statistics define."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from vqkit.audio.frontends import floor_db, row_frequencies
from vqkit.data.augment import add_noise, add_reverb, channel_gain, through_channel, warp_rows
from vqkit.data.cache import FeatureCache
from vqkit.errors import VqkitError
from vqkit.nn.normalise import Normaliser


def make_normaliser(cache: FeatureCache) -> Normaliser:
    """The normaliser the cache's config names, with the cache's train-split mean and std, so
    training and the codec (de)normalise exactly as :class:`SegmentDataset` does."""
    return Normaliser(
        cache.config.features.normalise,
        mean=torch.from_numpy(cache.stats["mean"]),
        std=torch.from_numpy(cache.stats["std"]),
    )


def item_side_info(normaliser: Normaliser, item: dict) -> Tensor:
    """The side information of a manifest row for ``normaliser``: ``(n_side,)``."""
    if normaliser.n_side == 0:
        return torch.zeros(0)
    return torch.tensor([item["x_min"], item["x_max"]], dtype=torch.float32)


class SegmentDataset(torch.utils.data.Dataset):
    """Normalised ``(F, segment_frames)`` float32 segments of one split of a cache.

    ``train=True`` crops at random (numpy generator seeded by ``seed`` and, in DataLoader workers,
    by the worker's seed); ``train=False`` takes the start. Shorter items are padded after their
    end with the quietest value before normalising: the features' silence
    (:func:`vqkit.audio.frontends.floor_db`) for "none" and "meanstd",
    the item's own minimum for the min-max kinds (so the padding normalises to ``low``).
    ``segment_frames == 0`` gives whole items; batch them with :meth:`collate`. An image cache
    gives whole images ``(C, H, W)`` in [-0.5, 0.5] whatever ``segment_frames`` is.
    ``augment`` is the share of training segments passed through a random recording channel
    (:mod:`vqkit.data.augment`) before normalising, ``reverb`` and ``noise`` the shares put in a
    random room before it and given noise after it, ``warp`` the share whose frequencies are
    scaled first (another speaker's vocal tract length); only dB features with the "none" or
    "meanstd" normalisation take them (the config check says so). Each draws from the random
    stream only when its share is above 0, so recipes without it crop and colour as before.
    """

    def __init__(
        self,
        cache: FeatureCache,
        split: str,
        segment_frames: int,
        train: bool = True,
        seed: int = 0,
        augment: float = 0.0,
        reverb: float = 0.0,
        noise: float = 0.0,
        warp: float = 0.0,
    ) -> None:
        if segment_frames < 0:
            raise VqkitError(f"segment_frames must be >= 0, got {segment_frames}")
        self.cache, self.split, self.segment_frames = cache, split, segment_frames
        self.train, self.seed, self.augment = train, seed, augment
        self.reverb, self.noise, self.warp = reverb, noise, warp
        self.items = cache.items(split)
        self.normaliser = make_normaliser(cache)
        self.floor_db = floor_db(cache.config.features.kind)
        self.frame_seconds = cache.config.features.hop_length / cache.config.audio.sample_rate
        self._rng: np.random.Generator | None = None
        self._rng_owner: object = None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Tensor:
        item = self.items[index]
        x = torch.from_numpy(self.cache.load(item))
        if self.cache.config.features.kind == "image":
            return x
        quiet = item["x_min"] if self.normaliser.n_side else self.floor_db
        n = self.segment_frames
        if n > 0 and x.shape[1] > n:
            start = int(self._generator().integers(0, x.shape[1] - n + 1)) if self.train else 0
            x = x[:, start : start + n]
        elif n > 0 and x.shape[1] < n:
            x = torch.nn.functional.pad(x, (0, n - x.shape[1]), value=quiet)
        if self._draw(self.warp):
            config = self.cache.config
            freqs = row_frequencies(config.features, config.audio.sample_rate)
            x = warp_rows(x, freqs, self._generator())
        if self._draw(self.reverb):
            x = add_reverb(x, self._generator(), self.frame_seconds)
        if self._draw(self.augment):
            x = through_channel(x, channel_gain(x.shape[0], self._generator()), quiet)
        if self._draw(self.noise):
            x = add_noise(x, self._generator(), quiet)
        side = item_side_info(self.normaliser, item)[None]
        with torch.no_grad():
            return self.normaliser.normalise(x[None], side)[0].contiguous()

    def collate(self, batch: list[Tensor]) -> Tensor:
        """Stack normalised items ``(F, N_i)`` into ``(B, F, max N_i)``, padding as above."""
        longest = max(x.shape[-1] for x in batch)
        pad = self._pad_value(batch[0])
        out = pad[None, :, None].repeat(len(batch), 1, longest)
        for i, x in enumerate(batch):
            out[i, :, : x.shape[-1]] = x
        return out

    def _pad_value(self, like: Tensor) -> Tensor:
        """The normalised padding value per bin ``(F,)``."""
        if self.normaliser.n_side:
            return torch.full(like.shape[:1], self.normaliser.low)
        silence = torch.full((1, like.shape[0], 1), self.floor_db)
        return self.normaliser.normalise(silence)[0, :, 0]

    def _draw(self, share: float) -> bool:
        """Whether this training segment takes an augmentation given to ``share`` of them."""
        return self.train and share > 0 and self._generator().random() < share

    def _generator(self) -> np.random.Generator:
        info = torch.utils.data.get_worker_info()
        owner = (info.id, info.seed) if info is not None else None
        if self._rng is None or owner != self._rng_owner:
            entropy = [self.seed] if info is None else [self.seed, info.seed]
            self._rng, self._rng_owner = np.random.default_rng(entropy), owner
        return self._rng
