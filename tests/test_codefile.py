"""The .vqc code file: bit-packing, header checks and fuzzing of the reader (no model needed)."""

from __future__ import annotations

import functools
import json
import math
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vqkit.codec.codefile import (
    FORMAT_VERSION,
    MAGIC,
    EncodedAudio,
    bits_per_code,
    pack_codes,
    packed_size,
    unpack_codes,
)
from vqkit.errors import VqkitError

# Every bit width 1..16 at its power of two, one less and one more, plus a few odd sizes.
CODEBOOK_SIZES = sorted(
    {2, 3, 5, 6, 7, 10, 100, 1000, 1023, 1024, 1025, 40000, 65535, 65536}
    | {2**b for b in range(1, 17)}
    | {2**b - 1 for b in range(2, 17)}
    | {2**b + 1 for b in range(1, 16)}
)


def make_encoded(
    codebook_sizes: tuple[int, ...] = (1024, 1024, 1024),
    n_code_frames: int = 7,
    seed: int = 0,
    gain_db: int = 0,
) -> EncodedAudio:
    rng = np.random.default_rng(seed)
    codes = np.stack([rng.integers(0, k, n_code_frames) for k in codebook_sizes])
    n_frames = 4 * n_code_frames - 1
    return EncodedAudio(
        model_id="0123456789abcdef",
        sample_rate=16000,
        hop_length=128,
        n_frames=n_frames,
        length=(n_frames - 1) * 128 * 3 + 5,  # at 48 kHz
        orig_sample_rate=48000,
        codebook_sizes=codebook_sizes,
        codes=codes,
        gain_db=gain_db,
    )


def with_header(header: dict, payload: bytes = b"", version: int = FORMAT_VERSION) -> bytes:
    """A code file with this header and payload and a correct CRC."""
    raw = json.dumps(header).encode()
    body = MAGIC + struct.pack("<BH", version, len(raw)) + raw + payload
    return body + struct.pack("<I", zlib.crc32(body))


def assert_same(a: EncodedAudio, b: EncodedAudio) -> None:
    assert a._header() == b._header()
    np.testing.assert_array_equal(a.codes, b.codes)


def test_bits_per_code() -> None:
    assert [bits_per_code(k) for k in (2, 3, 4, 5, 1024, 1025, 65536)] == [1, 2, 2, 3, 10, 11, 16]
    assert {bits_per_code(k) for k in CODEBOOK_SIZES} == set(range(1, 17))
    with pytest.raises(ValueError, match="codebook_size"):
        bits_per_code(65537)


@pytest.mark.parametrize("codebook_size", CODEBOOK_SIZES)
@pytest.mark.parametrize("n_code_frames", [1, 3, 13])
def test_pack_round_trip(codebook_size: int, n_code_frames: int) -> None:
    rng = np.random.default_rng(codebook_size)
    codes = rng.integers(0, codebook_size, (3, n_code_frames))
    codes[0, 0], codes[-1, -1] = 0, codebook_size - 1  # both extremes
    sizes = (codebook_size,) * 3
    data = pack_codes(codes, sizes)
    assert len(data) == math.ceil(3 * n_code_frames * math.ceil(math.log2(codebook_size)) / 8)
    np.testing.assert_array_equal(unpack_codes(data, sizes, n_code_frames), codes)


def test_pack_mixed_sizes_and_layout() -> None:
    codes = np.array([[1, 0], [2, 5]])  # stage 0: 1 bit, stage 1: 3 bits; frame-major, MSB first
    data = pack_codes(codes, (2, 6))
    assert data == bytes([0b1010_0101])
    np.testing.assert_array_equal(unpack_codes(data, (2, 6), 2), codes)


def test_pack_rejects_out_of_range() -> None:
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(np.array([[4]]), (4,))
    with pytest.raises(ValueError, match="shape"):
        pack_codes(np.zeros(3, dtype=int), (4,))


def test_unpack_rejects_codes_outside_codebook() -> None:
    with pytest.raises(VqkitError, match="outside its codebook"):
        unpack_codes(bytes([0b1110_0000]), (5,), 1)  # 7 >= 5
    with pytest.raises(VqkitError, match="padding bits"):
        unpack_codes(bytes([0b0000_0001]), (5,), 1)


@pytest.mark.parametrize(
    "sizes", [(1024,), (1024, 1024, 1024, 1024), (2, 3, 65536, 1000), (65536,) * 12]
)
def test_file_round_trip(sizes: tuple[int, ...]) -> None:
    encoded = make_encoded(sizes, n_code_frames=11, gain_db=-7)
    data = encoded.to_bytes()
    decoded = EncodedAudio.from_bytes(data)
    assert_same(decoded, encoded)
    assert decoded.codes.dtype == np.uint16
    header_size = struct.unpack_from("<H", data, 5)[0]
    assert len(data) == 7 + header_size + packed_size(11, sizes) + 4
    assert decoded.duration == pytest.approx(encoded.length / 48000)


def test_header_is_small_and_uses_one_size_when_shared() -> None:
    header = make_encoded((1024,) * 12).to_bytes()[7:]
    assert header.startswith(b'{"id":"0123456789abcdef","sr":16000,"hop":128,')
    assert b'"k":1024}' in header and b'"g"' not in header


def test_wrong_magic() -> None:
    with pytest.raises(VqkitError, match="wrong magic"):
        EncodedAudio.from_bytes(b"RIFF" + make_encoded().to_bytes()[4:])
    with pytest.raises(VqkitError, match="wrong magic"):
        EncodedAudio.from_bytes(b"\x00")


def test_truncated_at_every_length() -> None:
    data = make_encoded().to_bytes()
    for cut in range(len(data)):
        with pytest.raises(VqkitError, match="truncated"):
            EncodedAudio.from_bytes(data[:cut])


def test_bad_crc() -> None:
    data = bytearray(make_encoded().to_bytes())
    data[-6] ^= 0x10  # a payload bit
    with pytest.raises(VqkitError, match="CRC mismatch"):
        EncodedAudio.from_bytes(bytes(data))
    data = make_encoded().to_bytes()
    with pytest.raises(VqkitError, match="CRC mismatch"):
        EncodedAudio.from_bytes(data[:-1] + bytes([data[-1] ^ 1]))


def test_future_and_invalid_version() -> None:
    data = bytearray(make_encoded().to_bytes())
    data[4] = FORMAT_VERSION + 1
    with pytest.raises(VqkitError, match="newer than this vqkit reads.*upgrade"):
        EncodedAudio.from_bytes(bytes(data))
    data[4] = 0
    with pytest.raises(VqkitError, match="invalid format version 0"):
        EncodedAudio.from_bytes(bytes(data))


def test_absurd_sizes_fail_without_allocating() -> None:
    header = make_encoded()._header()
    # A valid CRC over a header that claims 2**30 code frames: refused as truncated, at once.
    absurd = {**header, "t": 2**30, "n": 2**30, "len": (2**30 - 1) * 128 * 3}
    with pytest.raises(VqkitError, match="truncated"):
        EncodedAudio.from_bytes(with_header(absurd))
    with pytest.raises(VqkitError, match="'t' must be an integer"):
        EncodedAudio.from_bytes(with_header({**header, "t": 2**60}))
    with pytest.raises(VqkitError, match="inconsistent"):
        EncodedAudio.from_bytes(with_header({**header, "len": 2**39}))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"x": 1}, "unknown field 'x'"),
        ({"id": 5}, "'id' must be a model id"),
        ({"sr": "16000"}, "'sr' must be an integer"),
        ({"sr": True}, "'sr' must be an integer"),
        ({"q": 0}, "'q' must be an integer in 1..64"),
        ({"k": 1}, "codebook sizes in 2..65536"),
        ({"k": [1024, 1024]}, "one int or a list of 'q' ints"),
        ({"g": 1.5}, "'g' must be an integer"),
    ],
)
def test_invalid_header_fields(change: dict, message: str) -> None:
    encoded = make_encoded()
    header = {**encoded._header(), **change}
    payload = pack_codes(encoded.codes, encoded.codebook_sizes)
    with pytest.raises(VqkitError, match=message):
        EncodedAudio.from_bytes(with_header(header, payload))
    missing = dict(encoded._header())
    del missing["hop"]
    with pytest.raises(VqkitError, match="lacks field 'hop'"):
        EncodedAudio.from_bytes(with_header(missing, payload))


def test_header_not_an_object_and_not_json() -> None:
    with pytest.raises(VqkitError, match="not a JSON object"):
        EncodedAudio.from_bytes(with_header([1, 2]))  # type: ignore[arg-type]
    body = MAGIC + struct.pack("<BH", FORMAT_VERSION, 3) + b"{\xff}"
    with pytest.raises(VqkitError, match="not valid JSON"):
        EncodedAudio.from_bytes(body + struct.pack("<I", zlib.crc32(body)))


def test_constructor_checks_codes() -> None:
    with pytest.raises(VqkitError, match="out of range"):
        make_encoded((4,)).__class__(**{**_fields(make_encoded((4,))), "codes": [[0, 9]]})
    with pytest.raises(VqkitError, match="shape"):
        EncodedAudio(**{**_fields(make_encoded((4,))), "codes": np.zeros((2, 3))})


def _fields(encoded: EncodedAudio) -> dict:
    return {name: getattr(encoded, name) for name in encoded.__dataclass_fields__}


# ---- fuzzing: the reader and the bit-packer never fail other than by a decode or a VqkitError ----
# benchmarks/fuzz_codefile.py imports these strategies and checks and runs them for much longer.


@functools.cache
def valid_files() -> list[bytes]:
    """Valid files to mutate: various stage counts, codebook sizes and lengths."""
    picks = [(2,), (3, 5), (1024,) * 4, (65536, 2, 1000), (7,) * 9, (40000,)]
    return [make_encoded(s, n, seed).to_bytes() for seed, s in enumerate(picks) for n in (1, 6)]


def mutate(data: bytes, script: bytes) -> bytes:
    """Apply an edit script: each 4 bytes (op, position high, position low, value) sets a byte,
    cuts, inserts or flips a bit; an odd-length script then fixes up the CRC, so the header and
    payload checks behind the CRC are reached too."""
    out = bytearray(data)
    for i in range(0, len(script) - 3, 4):
        op, high, low, value = script[i : i + 4]
        at = (high << 8 | low) % (len(out) + 1)
        if op % 4 == 0 and at < len(out):
            out[at] = value
        elif op % 4 == 1:
            del out[at : at + 1 + value % 8]
        elif op % 4 == 2:
            out[at:at] = bytes([value]) * (1 + op // 4 % 8)
        elif at < len(out):
            out[at] ^= 1 << value % 8
    if len(script) % 2 and len(out) > 4:
        out[-4:] = struct.pack("<I", zlib.crc32(bytes(out[:-4])))
    return bytes(out)


mutated_files = st.tuples(st.integers(0, 11), st.binary(min_size=4, max_size=17)).map(
    lambda pick: mutate(valid_files()[pick[0]], pick[1])
)


JSON_VALUES = [0, 1, 2, 3, 127, 128, 16000, 1024, 65536, 65537, -1, 2**40, 2**70, True, None, 1.5]
JSON_VALUES += ["x", "0123456789abcdef", [], {}, [1024, 1024], [2, 65536, 3], [1024] * 65]


FIELDS = ["id", "sr", "hop", "n", "t", "len", "osr", "q", "k", "g", "zz"]


def craft(pick: int, changes: bytes, cut: int) -> bytes:
    """A correct-CRC file from ``valid_files()[pick]`` whose header fields are changed as the
    byte pairs (field, value) in ``changes`` say, and whose payload loses ``cut`` bytes."""
    encoded = EncodedAudio.from_bytes(valid_files()[pick])
    header = encoded._header()
    for field, value in zip(changes[::2], changes[1::2], strict=False):
        key = FIELDS[field % len(FIELDS)]
        near = header.get(key, 0)  # an integer field nudged up or down, else an awkward value
        if value < len(JSON_VALUES) or not isinstance(near, int):
            header[key] = JSON_VALUES[value % len(JSON_VALUES)]
        else:
            header[key] = near + value % 64 - 32
    payload = pack_codes(encoded.codes, encoded.codebook_sizes)
    return with_header(header, payload[: len(payload) - cut])


crafted_files = st.builds(craft, st.integers(0, 11), st.binary(max_size=6), st.integers(0, 1))


def check_reader(data: bytes) -> None:
    """Reading either fails with VqkitError or gives a file that writes and reads back the same."""
    try:
        encoded = EncodedAudio.from_bytes(data)
    except VqkitError:
        return
    assert_same(EncodedAudio.from_bytes(encoded.to_bytes()), encoded)


def random_codes(seed: int, n_stages: int, n_code_frames: int) -> tuple[np.ndarray, tuple]:
    """Codes of random stages: half the sizes from CODEBOOK_SIZES (all widths), half uniform."""
    rng = np.random.default_rng(seed)
    sizes = tuple(
        int(rng.choice(CODEBOOK_SIZES)) if rng.random() < 0.5 else int(rng.integers(2, 65537))
        for _ in range(n_stages)
    )
    codes = np.stack([rng.integers(0, k, n_code_frames) for k in sizes])
    codes[:, rng.integers(0, n_code_frames)] = np.array(sizes) - 1  # one all-maximal frame
    return codes, sizes


code_arrays = st.builds(
    random_codes, st.integers(0, 2**32 - 1), st.integers(1, 6), st.integers(1, 40)
)


def check_packer(inputs: tuple[tuple[np.ndarray, tuple[int, ...]], bytes]) -> None:
    """Packing round trips; unpacking arbitrary bytes of the right size decodes or VqkitErrors."""
    (codes, sizes), noise = inputs
    data = pack_codes(codes, sizes)
    assert len(data) == packed_size(codes.shape[1], sizes)
    np.testing.assert_array_equal(unpack_codes(data, sizes, codes.shape[1]), codes)
    garbage = (noise * (len(data) // max(len(noise), 1) + 1))[: len(data)] if noise else data
    try:
        out = unpack_codes(garbage, sizes, codes.shape[1])
    except VqkitError:
        return
    assert pack_codes(out, sizes) == garbage


random_files = st.binary(max_size=64).map(lambda tail: MAGIC + tail)
packer_inputs = st.tuples(code_arrays, st.binary(max_size=16))

# name -> (strategy, check, examples here); benchmarks/fuzz_codefile.py runs them for longer.
FUZZ_TARGETS = {
    "mutated files": (mutated_files, check_reader, 3000),
    "crafted headers": (crafted_files, check_reader, 3000),
    "random bytes": (random_files, check_reader, 1000),
    "bit-packer": (packer_inputs, check_packer, 3000),
}


@pytest.mark.parametrize("name", FUZZ_TARGETS)
def test_fuzz(name: str) -> None:
    strategy, check, examples = FUZZ_TARGETS[name]
    ran = []

    def counted(data: object) -> None:
        ran.append(1)
        check(data)

    run = settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )(given(strategy)(counted))
    run()
    assert len(ran) >= examples  # every example ran: 10,000 in all over the four targets
