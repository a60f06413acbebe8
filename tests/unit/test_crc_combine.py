"""io/crc_combine.crc32_combine against zlib over the concatenation (hypothesis)."""

import zlib

from hypothesis import given
from hypothesis import strategies as st

from shardckpt.io.crc_combine import crc32_combine


@given(st.binary(max_size=300), st.binary(max_size=300))
def test_combine_is_the_crc32_of_the_concatenation(a: bytes, b: bytes) -> None:
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


def test_long_second_part_and_a_chain_of_parts() -> None:
    parts = [bytes(range(256)) * 17, b"", b"x" * (1 << 20) + b"y", b"tail"]
    crc = 0
    for p in parts:
        crc = crc32_combine(crc, zlib.crc32(p), len(p))
    assert crc == zlib.crc32(b"".join(parts))
