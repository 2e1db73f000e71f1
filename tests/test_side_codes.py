"""The side codings of pitch and voicing: ``joint`` (11 bits per 40 ms) beside ``separate``."""

from __future__ import annotations

import math

import pytest
import torch

from vqkit.audio.pitch import F0_MAX, F0_MIN
from vqkit.codec import joint
from vqkit.codec.side import side_codebooks, side_codes, side_coding_of, side_from_codes
from vqkit.errors import VqkitError

STEP = math.log(F0_MAX / F0_MIN) / (2**joint.PITCH_BITS - 1)  # one fine log-F0 step


def test_side_codebooks_of_each_coding() -> None:
    assert side_codebooks(4, "joint") == (1921,)  # 11 bits: 275 bit/s at 25 code frames/s
    assert side_codebooks(4, "separate") == (128, 128, 16)  # 18 bits: 450 bit/s
    assert side_codebooks(2, "joint") == (1 + 128 * 12 + 2 * 32 * 2,)
    assert side_coding_of((1921, 1024, 1024), 4) == "joint"
    assert side_coding_of((128, 128, 16, 1024), 4) == "separate"
    assert side_coding_of((128, 1024), 4) is None
    with pytest.raises(VqkitError, match="unknown codec.side_coding 'jiont'"):
        side_codebooks(4, "jiont")


def test_joint_codes_carry_monotone_voicing_and_a_gliding_pitch() -> None:
    n = 37  # not a multiple of the code frame
    frames = torch.arange(n, dtype=torch.float32)
    f0 = (120.0 * torch.exp(0.01 * frames)).expand(2, n).clone()  # a glide of 17 cents a frame
    voiced = torch.ones(2, n)
    voiced[0, :6] = 0  # an onset inside the second code frame
    voiced[1, 20:] = 0  # an offset at a code frame's boundary
    codes = side_codes(f0, voiced, 4, "joint")
    assert codes.shape == (2, 1, math.ceil(n / 4))
    assert (codes >= 0).all() and (codes < joint.codebook_size(4)).all()
    f0_hat, voiced_hat = side_from_codes(codes, 4, n, "joint")
    torch.testing.assert_close(voiced_hat, voiced)
    steady = (voiced[0] > 0) & (frames >= 8)  # all-voiced code frames get the fine grid
    error = (f0_hat[0, steady].log() - f0[0, steady].log()).abs()
    assert error.max() <= STEP / 2 + 0.01  # half a pitch step plus the slope grid's error
    assert (f0_hat[1, 21:] == f0_hat[1, 20]).all()  # unvoiced frames hold the last pitch


def test_joint_codes_depend_on_their_own_frames_only() -> None:
    f0, voiced = torch.full((1, 16), 200.0), torch.ones(1, 16)
    changed_f0, changed_voiced = f0.clone(), voiced.clone()
    changed_f0[0, 4:8], changed_voiced[0, 8:12] = 300.0, 0.0
    before = side_codes(f0, voiced, 4, "joint")[0, 0]
    after = side_codes(changed_f0, changed_voiced, 4, "joint")[0, 0]
    assert after[2] == 0 and (before != after).tolist() == [False, True, True, False]


def test_joint_codes_pick_the_nearest_voicing_pattern() -> None:
    voiced = torch.tensor([[0.0, 1, 0, 0, 1, 0, 1, 1]])  # one voiced frame; a gap
    codes = side_codes(torch.full((1, 8), 150.0), voiced, 4, "joint")
    assert side_from_codes(codes, 4, 8, "joint")[1].tolist() == [[0, 0, 0, 0, 1, 1, 1, 1]]


@pytest.mark.parametrize("coding", ["separate", "joint"])
def test_causal_side_decoding_waits_for_no_later_code_frame(coding: str) -> None:
    """A causal model's stream decodes each packet at once, so its F0 may not look at the next
    code frame; decoded from a prefix of the codes, the frames are those of the whole."""
    torch.manual_seed(0)
    n = 48
    f0 = torch.exp(torch.linspace(math.log(110), math.log(220), n) + 0.1 * torch.randn(n))[None]
    voiced = (torch.rand(1, n) > 0.3).float()
    codes = side_codes(f0, voiced, 4, coding)
    whole = side_from_codes(codes, 4, n, coding, causal=True)
    centred = side_from_codes(codes, 4, n, coding)
    differs = False
    for j in range(1, n // 4):
        part = side_from_codes(codes[..., :j], 4, 4 * j, coding, causal=True)
        assert torch.equal(part[0], whole[0][:, : 4 * j]) and torch.equal(
            part[1], whole[1][:, : 4 * j]
        )
        ahead = side_from_codes(codes[..., :j], 4, 4 * j, coding)
        differs |= not torch.equal(ahead[0], centred[0][:, : 4 * j])
    assert differs  # the centred decoding does look ahead
    assert torch.equal(whole[1], centred[1])  # voicing is the same either way
