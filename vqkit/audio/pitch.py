"""Pitch and voicing of the parametric speech model, from YIN's difference function, in torch.

Frame ``i`` is centred on sample ``i * hop_length``. Both methods start from YIN's cumulative mean
normalised difference function (CMNDF, de Cheveigne and Kawahara, 2002) over
:data:`YIN_WINDOW` seconds of signal: its dips are the candidate periods, and a dip's depth is
the frame's aperiodicity at that period. Frames quieter than :data:`SILENCE_DB` are unvoiced.

- ``"yin"``: the first dip under :data:`YIN_THRESHOLD` (its lowest point), parabolic
  interpolation; a frame is voiced when that dip is under :data:`VOICED_APERIODICITY`; a
  3-frame median then removes isolated decisions and octave jumps.
- ``"tracked"``: pYIN's idea (Mauch and Dixon, 2014) with a bounded look. Every trough of the
  CMNDF is a candidate, weighted by the chance that it is the first trough under a threshold
  drawn from a Beta(2, :data:`PRIOR_B`) prior, so a shallow trough at a short lag outweighs a
  deeper one at its multiple only as far as the prior allows. The frames' :data:`CANDIDATES`
  heaviest candidates and an unvoiced state form a hidden Markov model (pitch jumps cost in
  cents, voicing switches cost :data:`SWITCH`), and each frame takes its state on the best path
  through the frames from :data:`TRACK_BACK` before it to :data:`TRACK_AHEAD` after it.
  Resynthesised from the true envelope, its pitch and voicing score 0.08 to 0.09 PESQ-NB above
  the first dip's on three sets of speech (``benchmarks/RESULTS.md``).

Each decision looks a bounded number of frames either side (:meth:`PitchTracker.reach`), so
analysis chunk by chunk equals whole-file analysis once chunks carry that context.
"""

from __future__ import annotations

import math
import typing

import torch
import torch.nn.functional as F
from torch import Tensor

from vqkit.config import PitchMethod
from vqkit.errors import VqkitError

F0_MIN, F0_MAX = 50.0, 500.0  # Hz, the pitch range tracked and coded
YIN_WINDOW = 0.025  # seconds of signal integrated per lag
SILENCE_DB = -60.0  # frames quieter than this (RMS, dBFS) are unvoiced
YIN_THRESHOLD = 0.15  # "yin": the first CMNDF dip under this is the period
VOICED_APERIODICITY = 0.42  # "yin": a frame is voiced when its CMNDF dip is below this
PRIOR_B = 18.0  # "tracked": thresholds ~ Beta(2, PRIOR_B), mean 0.1 (pYIN's default)
CANDIDATES = 4  # "tracked": candidate periods kept per frame
UNVOICED_LOG_WEIGHT = -10.0  # "tracked": log weight of the unvoiced state against a candidate
SWITCH = math.log(0.01)  # "tracked": log probability of a voicing switch between frames
JUMP_PER_CENT = 0.01  # "tracked": log cost of a pitch change between frames, per cent
MAX_JUMP_CENTS = 600.0  # "tracked": larger changes between voiced frames are not followed
TRACK_BACK, TRACK_AHEAD = 10, 1  # "tracked": frames a decision looks back and ahead
# Frames analysed at a time: the work arrays are frames x FFT bins, ~130 MB for a whole codec
# chunk (20 s) at once; blocks keep that to a few MB whatever the chunk, the same result.
YIN_BLOCK_FRAMES = 256


class PitchTracker:
    """Waveform ``(B, T)`` -> F0 in Hz and voicing (0 or 1) ``(B, N)``, ``N = 1 + T // hop``,
    by ``method``; unvoiced frames keep a raw estimate."""

    def __init__(self, sample_rate: int, hop_length: int, method: PitchMethod) -> None:
        if method not in typing.get_args(PitchMethod):
            valid = " or ".join(map(repr, typing.get_args(PitchMethod)))
            raise VqkitError(f"features.pitch must be {valid}, got {method!r}")
        self.sample_rate, self.hop_length, self.method = sample_rate, hop_length, method
        self.max_lag = math.ceil(sample_rate / F0_MIN)
        self.min_lag = math.floor(sample_rate / F0_MAX)
        self.window = round(YIN_WINDOW * sample_rate)
        self.size = self.window + self.max_lag  # samples a frame's CMNDF reads

    def reach(self) -> tuple[int, int]:
        """Samples of signal a frame's decision reads before and after its centre."""
        back, ahead = (TRACK_BACK, TRACK_AHEAD) if self.method == "tracked" else (1, 1)
        hop = self.hop_length
        return back * hop + self.size // 2, ahead * hop + self.size - self.size // 2

    def __call__(self, wave: Tensor, n_frames: int) -> tuple[Tensor, Tensor]:
        size, hop = self.size, self.hop_length
        padded = F.pad(wave, (size // 2, size // 2 + hop))
        frames = padded.unfold(-1, size, hop)[:, :n_frames]  # (B, N, size) view
        blocks = [frames[:, i : i + YIN_BLOCK_FRAMES] for i in range(0, n_frames, YIN_BLOCK_FRAMES)]
        if self.method == "yin":
            f0, voiced = zip(*(self._first_dip(*self._cmndf(b)) for b in blocks), strict=True)
            f0 = _median3(torch.cat(f0, -1).clamp(F0_MIN, F0_MAX))
            return f0, _median3(torch.cat(voiced, -1).float())
        f0, log_weight = zip(*(self._candidates(*self._cmndf(b)) for b in blocks), strict=True)
        f0, log_weight = torch.cat(f0, 1), torch.cat(log_weight, 1)
        state = _best_states(f0, log_weight)
        voiced = state < CANDIDATES
        chosen = f0.gather(-1, state.clamp(max=CANDIDATES - 1)[..., None])[..., 0]
        return torch.where(voiced, chosen, f0[..., 0]), voiced.float()

    def _cmndf(self, frames: Tensor) -> tuple[Tensor, Tensor]:
        """The CMNDF ``(B, N, max_lag + 1)`` of frames ``(B, N, size)`` (2 below the shortest
        lag), and whether each frame is loud enough to be voiced ``(B, N)``."""
        w, max_lag = self.window, self.max_lag
        frames = frames - frames.mean(-1, keepdim=True)
        n_fft = 1 << (2 * self.size - 1).bit_length()
        spec = torch.fft.rfft(frames, n_fft)
        head = torch.fft.rfft(frames[..., :w], n_fft)
        corr = torch.fft.irfft(spec * head.conj(), n_fft)[..., : max_lag + 1]  # r(tau)
        energy = F.pad(frames.square().cumsum(-1), (1, 0))  # (B, N, size + 1)
        lags = torch.arange(max_lag + 1)
        shifted = energy[..., lags + w] - energy[..., lags]  # energy of x[tau : tau + w]
        diff = (energy[..., w : w + 1] + shifted - 2 * corr).clamp(min=0)
        cumulative = diff[..., 1:].cumsum(-1) / torch.arange(1, max_lag + 1)
        cmndf = torch.cat(
            [torch.ones_like(diff[..., :1]), diff[..., 1:] / cumulative.clamp(min=1e-12)], -1
        )
        cmndf[..., : self.min_lag] = 2.0
        level = 10 * torch.log10(frames[..., :w].square().mean(-1).clamp(min=1e-10))
        return cmndf, level > SILENCE_DB

    def _first_dip(self, cmndf: Tensor, loud: Tensor) -> tuple[Tensor, Tensor]:
        """``"yin"``'s raw F0 (Hz) and voicing (bool) ``(B, N)``."""
        lags = torch.arange(cmndf.shape[-1])
        below = cmndf < YIN_THRESHOLD
        after = lags >= below.float().argmax(-1, keepdim=True)  # from the first lag under it
        region = after & ((~below & after).cumsum(-1) == 0)  # the run of lags under the threshold
        tau = torch.where(  # the lowest point of that run, or the global minimum if none
            below.any(-1), cmndf.masked_fill(~region, 3.0).argmin(-1), cmndf.argmin(-1)
        )
        f0, depth = self._refine(cmndf, tau[..., None])
        return f0[..., 0], (depth[..., 0] < VOICED_APERIODICITY) & loud

    def _candidates(self, cmndf: Tensor, loud: Tensor) -> tuple[Tensor, Tensor]:
        """``"tracked"``'s candidates: F0s (Hz) ``(B, N, C)``, heaviest first, and the log weights
        of those candidates and of the unvoiced state ``(B, N, C + 1)``."""
        trough = F.pad(
            (cmndf[..., 1:-1] < cmndf[..., :-2]) & (cmndf[..., 1:-1] <= cmndf[..., 2:]), (1, 1)
        )
        depth = torch.where(trough, cmndf, 2.0)
        # a trough is the first under every threshold between its depth and the shallowest
        # depth of the troughs at shorter lags
        shorter = F.pad(depth[..., :-1].clamp(max=1.0), (1, 0), value=1.0).cummin(-1).values
        weight = (_prior_cdf(shorter) - _prior_cdf(depth)).clamp(min=0) * (trough & loud[..., None])
        weight, tau = weight.topk(CANDIDATES, -1)
        f0 = self._refine(cmndf, tau)[0]
        unvoiced = torch.log1p(-weight.sum(-1).clamp(max=1 - 1e-6)) + UNVOICED_LOG_WEIGHT
        return f0, torch.cat([torch.log(weight + 1e-9), unvoiced[..., None]], -1)

    def _refine(self, cmndf: Tensor, tau: Tensor) -> tuple[Tensor, Tensor]:
        """F0 (Hz) at lags ``tau`` ``(B, N, C)`` by parabolic interpolation of the CMNDF, and the
        CMNDF there."""
        tau = tau.clamp(1, self.max_lag - 1)
        before, at, after = (cmndf.gather(-1, tau + shift) for shift in (-1, 0, 1))
        curve = before - 2 * at + after
        offset = torch.where(curve > 0, 0.5 * (before - after) / curve.clamp(min=1e-9), 0)
        f0 = self.sample_rate / (tau + offset.clamp(-1, 1))
        return f0.clamp(F0_MIN, F0_MAX), at


def _prior_cdf(x: Tensor) -> Tensor:
    """The CDF of Beta(2, :data:`PRIOR_B`) at ``x``: ``1 - (1 - x)^b (1 + b x)`` on [0, 1]."""
    x = x.clamp(0, 1)
    return 1 - (1 - x) ** PRIOR_B * (1 + PRIOR_B * x)


def _best_states(f0: Tensor, log_weight: Tensor) -> Tensor:
    """Each frame's state ``(B, N)`` (a candidate's index, or ``C`` for unvoiced) on the best path
    of the frames ``[i - TRACK_BACK, i + TRACK_AHEAD]``; frames past the ends are unvoiced.

    ``f0`` ``(B, N, C)`` and ``log_weight`` ``(B, N, C + 1)`` as :meth:`PitchTracker._candidates`
    gives them. Every frame's window runs at once: Viterbi over ``TRACK_BACK + TRACK_AHEAD``
    steps on ``(B, N, C + 1)`` arrays."""
    n, c = f0.shape[1], f0.shape[2]
    pads = (0, 0, TRACK_BACK, TRACK_AHEAD)
    outside = torch.full((c + 1,), -30.0)
    outside[c] = 0.0  # certainly unvoiced
    weight = F.pad(log_weight, pads)
    weight[:, :TRACK_BACK], weight[:, n + TRACK_BACK :] = outside, outside
    log_f0 = torch.log2(F.pad(f0, pads, value=100.0))
    window = torch.arange(n)[:, None] + torch.arange(TRACK_BACK + TRACK_AHEAD + 1)  # (N, W)
    weight, log_f0 = weight[:, window], log_f0[:, window]  # (B, N, W, C + 1) and (B, N, W, C)
    moves = torch.full((*f0.shape[:2], c + 1, c + 1), SWITCH)  # from state, to state
    moves[..., c, c] = 0.0
    score, pointers = weight[:, :, 0], []
    for k in range(1, window.shape[1]):
        cents = 1200 * (log_f0[:, :, k - 1, :, None] - log_f0[:, :, k, None, :]).abs()
        moves[..., :c, :c] = torch.where(cents > MAX_JUMP_CENTS, -1e3, -JUMP_PER_CENT * cents)
        score, pointer = (score[..., None] + moves).max(-2)
        score = score + weight[:, :, k]
        pointers.append(pointer)
    state = score.argmax(-1)
    for pointer in reversed(pointers[TRACK_BACK:]):  # back to the window's own frame
        state = pointer.gather(-1, state[..., None])[..., 0]
    return state


def _median3(x: Tensor) -> Tensor:
    """Median over each frame and its neighbours ``(B, N)`` (edges repeat)."""
    padded = F.pad(x[:, None], (1, 1), mode="replicate")[:, 0]
    return padded.unfold(-1, 3, 1).median(-1).values
