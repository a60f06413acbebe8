"""Block geometry (shardckpt/format/blocks.py): pure functions, checked against brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardckpt.format import blocks as geo
from shardckpt.format.blocks import Block


def _recs(raw_lens, stored_lens=None):
    stored_lens = stored_lens or [max(1, n // 2) for n in raw_lens]
    return [[s, r, 1000 + i, "z"] for i, (s, r) in enumerate(zip(stored_lens, raw_lens))]


# ------------------------------------------------------------------ item_blocks


def test_item_blocks_offsets_and_raw_starts():
    recs = [[10, 16, 11, "z"], [5, 16, 22, "z"], [3, 4, 33, "r"]]
    bl = geo.item_blocks(100, recs)
    assert [b.offset for b in bl] == [100, 110, 115]
    assert [b.stored_len for b in bl] == [10, 5, 3]
    assert [b.raw_len for b in bl] == [16, 16, 4]
    assert [b.raw_start for b in bl] == [0, 16, 32]
    assert [b.crc for b in bl] == [11, 22, 33]
    assert [b.record for b in bl] == recs
    assert bl[2].record is recs[2]


def test_item_blocks_empty():
    assert geo.item_blocks(7, []) == []


# ------------------------------------------------------------------ blocks_for_range


@pytest.mark.parametrize("start,end,want", [
    (0, 0, []), (5, 5, []), (9, 3, []),
    (0, 1, [0]), (0, 16, [0]), (15, 16, [0]), (15, 17, [0, 1]), (16, 32, [1]),
    (16, 33, [1, 2]), (31, 33, [1, 2]), (32, 36, [2]), (35, 36, [2]), (0, 36, [0, 1, 2]),
    (32, 1000, [2]), (36, 40, []),
])
def test_blocks_for_range(start, end, want):
    bl = geo.item_blocks(0, _recs([16, 16, 4]))
    assert [b.raw_start for b in geo.blocks_for_range(bl, start, end)] == [
        [0, 16, 32][i] for i in want]


# ------------------------------------------------------------------ row_major_strides


@pytest.mark.parametrize("sizes,want", [
    ([], []), ([5], [1]), ([2, 3, 4], [12, 4, 1]), ([3, 0, 2], [0, 2, 1]),
    ([7, 1, 1, 9], [9, 9, 9, 1]),
])
def test_row_major_strides(sizes, want):
    assert geo.row_major_strides(sizes) == want


# ------------------------------------------------------------------ box_runs (examples)


@pytest.mark.parametrize("offsets,lengths,sizes,starts,run", [
    # inner dim cut: one run per row
    ([1, 2], [2, 3], [4, 6], [8, 14], 3),
    # rows complete: one contiguous span
    ([1, 0], [2, 6], [4, 6], [6], 12),
    # the whole chunk
    ([0, 0], [4, 6], [4, 6], [0], 24),
    # middle dim cut, last dim full: runs of 2 rows x 4
    ([0, 1, 0], [2, 2, 4], [2, 3, 4], [4, 16], 8),
    # only the outermost dim is partial: contiguous
    ([1, 0, 0], [1, 3, 4], [2, 3, 4], [12], 12),
    # single element
    ([1, 2, 3], [1, 1, 1], [2, 3, 4], [23], 1),
    # 1-d
    ([3], [4], [10], [3], 4),
    # 0-d (a scalar chunk)
    ([], [], [], [0], 1),
])
def test_box_runs_examples(offsets, lengths, sizes, starts, run):
    got_starts, got_run = geo.box_runs(offsets, lengths, sizes)
    assert got_starts.dtype == np.int64
    assert got_starts.tolist() == starts
    assert got_run == run


def test_box_runs_exactly_max_runs_are_listed():
    # 1024 * 1024 = 2**20 runs of one element each: still listed, not merged.
    starts, run = geo.box_runs([0, 0, 1], [1024, 1024, 1], [1024, 1024, 2])
    assert run == 1
    assert len(starts) == 1 << 20
    assert np.array_equal(starts, np.arange(1 << 20, dtype=np.int64) * 2 + 1)


@pytest.mark.parametrize("last_off", [0, 1])
def test_box_runs_too_many_runs_fall_back_to_the_span(last_off):
    # 1025 * 1024 runs > 2**20: one span from the first to the last element of the box.
    sizes = [1025, 1024, 2]
    starts, run = geo.box_runs([0, 0, last_off], [1025, 1024, 1], sizes)
    first = last_off
    last = 1024 * 2048 + 1023 * 2 + last_off
    assert starts.tolist() == [first]
    assert run == last + 1 - first
    # the span's blocks are every block from the first to the last byte of the box
    esize = 4
    total = math.prod(sizes) * esize
    bs = 4096
    bl = geo.item_blocks(0, _recs([bs] * (total // bs) + ([total % bs] if total % bs else [])))
    chosen = geo.blocks_for_runs(bl, starts * esize, run * esize)
    lo, hi = first * esize, (last + 1) * esize
    want = [b for b in bl if b.raw_start < hi and b.raw_start + b.raw_len > lo]
    assert chosen == want


# ------------------------------------------------------------------ blocks_for_runs (examples)


def test_blocks_for_runs_examples():
    bl = geo.item_blocks(0, _recs([8, 8, 8, 8, 8]))  # raw [0,8) [8,16) ... [32,40)
    pick = lambda starts, n: [b.raw_start for b in geo.blocks_for_runs(  # noqa: E731
        bl, np.array(starts, dtype=np.int64), n)]
    assert pick([0], 8) == [0]
    assert pick([7], 2) == [0, 8]
    assert pick([1, 33], 2) == [0, 32]           # skips the blocks in between
    assert pick([8, 16], 8) == [8, 16]
    assert pick([15], 2) == [8, 16]
    assert pick([0], 40) == [0, 8, 16, 24, 32]
    assert pick([20, 2, 20], 1) == [0, 16]       # unsorted, repeated starts
    assert pick([], 4) == []
    assert pick([3], 0) == []
    assert geo.blocks_for_runs([], np.array([0]), 4) == []


# ------------------------------------------------------------------ coalesce


def test_coalesce_groups_file_adjacent_blocks():
    bl = geo.item_blocks(50, [[10, 16, 0, "z"], [5, 16, 0, "z"], [3, 4, 0, "z"]])
    b0, b1, b2 = bl
    assert geo.coalesce([]) == []
    assert geo.coalesce([b2, b0]) == [(50, 10, [b0]), (65, 3, [b2])]
    assert geo.coalesce([b2, b1, b0]) == [(50, 18, [b0, b1, b2])]
    assert geo.coalesce([b1, b2]) == [(60, 8, [b1, b2])]
    # blocks of the next item in the same file, written right after, join the read
    nxt = geo.item_blocks(68, [[7, 7, 0, "r"]])[0]
    far = geo.item_blocks(100, [[1, 1, 0, "r"]])[0]
    assert geo.coalesce([far, nxt, b2]) == [(65, 10, [b2, nxt]), (100, 1, [far])]


# ------------------------------------------------------------------ box_span_bytes (examples)


@pytest.mark.parametrize("offsets,lengths,sizes,esize,want", [
    ([1, 2], [2, 3], [4, 6], 4, (32, 68)),
    ([0, 0], [4, 6], [4, 6], 2, (0, 48)),
    ([3], [1], [10], 8, (24, 32)),
    ([], [], [], 4, (0, 4)),
    ([0, 1, 0], [2, 2, 4], [2, 3, 4], 1, (4, 24)),
    ([1, 2], [0, 3], [4, 6], 4, None),
    ([1, 2], [2, 0], [4, 6], 4, None),
])
def test_box_span_bytes_examples(offsets, lengths, sizes, esize, want):
    assert geo.box_span_bytes(offsets, lengths, sizes, esize) == want


# ------------------------------------------------------------------ properties


@st.composite
def box_case(draw):
    ndim = draw(st.integers(0, 4))
    sizes = [draw(st.integers(1, 6)) for _ in range(ndim)]
    offsets, lengths = [], []
    for n in sizes:
        o = draw(st.integers(0, n - 1))
        offsets.append(o)
        lengths.append(draw(st.integers(1, n - o)))
    esize = draw(st.sampled_from([1, 2, 4, 8]))
    total = math.prod(sizes) * esize
    if draw(st.booleans()):
        bs = draw(st.integers(1, max(1, total)))
        raw_lens = [bs] * (total // bs) + ([total % bs] if total % bs else [])
    else:  # arbitrary block boundaries
        cuts = sorted(set(draw(st.lists(st.integers(1, max(1, total - 1)), max_size=12))))
        cuts = [c for c in cuts if 0 < c < total]
        edges = [0, *cuts, total]
        raw_lens = [b - a for a, b in zip(edges, edges[1:])]
    stored = [draw(st.integers(1, 50)) for _ in raw_lens]
    file_off = draw(st.integers(0, 1000))
    return sizes, offsets, lengths, esize, raw_lens, stored, file_off


def _box_bytes(sizes, offsets, lengths, esize) -> np.ndarray:
    """Every raw byte offset of the box in the row-major chunk, by brute force."""
    if not sizes:
        return np.arange(esize)
    idx = np.indices(lengths).reshape(len(sizes), -1) + np.array(offsets)[:, None]
    flat = np.ravel_multi_index(tuple(idx), sizes)
    return np.unique((flat[:, None] * esize + np.arange(esize)[None, :]).ravel())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(box_case())
def test_box_runs_are_exactly_the_box(case):
    sizes, offsets, lengths, esize, *_ = case
    starts, run = geo.box_runs(offsets, lengths, sizes)
    elems = np.unique(_box_bytes(sizes, offsets, lengths, 1) if sizes else np.array([0]))
    # runs are sorted, disjoint, and their union is exactly the box's elements
    assert np.all(np.diff(starts) >= run)
    covered = (starts[:, None] + np.arange(run)[None, :]).ravel()
    assert covered.tolist() == elems.tolist()
    # and there are as few runs as the box's shape allows
    k = len(sizes) - 1
    while k >= 0 and lengths[k] == sizes[k]:
        k -= 1
    assert len(starts) == (math.prod(lengths[:k]) if k > 0 else 1)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(box_case())
def test_box_blocks_cover_the_box_and_nothing_else(case):
    sizes, offsets, lengths, esize, raw_lens, stored, file_off = case
    recs = [[s, r, 0, "z"] for s, r in zip(stored, raw_lens)]
    bl = geo.item_blocks(file_off, recs)
    assert sum(raw_lens) == math.prod(sizes) * esize
    starts, run = geo.box_runs(offsets, lengths, sizes)
    chosen = geo.blocks_for_runs(bl, starts * esize, run * esize)
    need = _box_bytes(sizes, offsets, lengths, esize)
    # independently: the blocks holding at least one byte of the box
    edges = np.cumsum([0, *raw_lens])
    holding = set(np.searchsorted(edges, need, side="right") - 1)
    assert [b.raw_start for b in chosen] == [int(edges[i]) for i in sorted(holding)]
    # every byte of the box lies in a chosen block; every chosen block holds one
    for b in chosen:
        assert np.any((need >= b.raw_start) & (need < b.raw_start + b.raw_len))
    in_chosen = np.zeros(len(need), dtype=bool)
    for b in chosen:
        in_chosen |= (need >= b.raw_start) & (need < b.raw_start + b.raw_len)
    assert in_chosen.all()
    # reads of the chosen blocks: file-adjacent ones merge, total length preserved
    reads = geo.coalesce(chosen)
    assert sum(n for _, n, _ in reads) == sum(b.stored_len for b in chosen)
    assert [b for _, _, bs in reads for b in bs] == chosen
    for (o1, n1, _), (o2, _, _) in zip(reads, reads[1:]):
        assert o1 + n1 < o2
    for off, n, bs in reads:
        assert off == bs[0].offset and n == sum(b.stored_len for b in bs)
        assert all(a.offset + a.stored_len == c.offset for a, c in zip(bs, bs[1:]))


@settings(max_examples=300, deadline=None)
@given(box_case())
def test_box_span_bytes_is_first_to_last_byte(case):
    sizes, offsets, lengths, esize, *_ = case
    need = _box_bytes(sizes, offsets, lengths, esize)
    assert geo.box_span_bytes(offsets, lengths, sizes, esize) == (int(need.min()),
                                                                  int(need.max()) + 1)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=10), st.data())
def test_blocks_for_range_matches_brute_force(raw_lens, data):
    total = sum(raw_lens)
    start = data.draw(st.integers(0, total))
    end = data.draw(st.integers(0, total + 5))
    bl = geo.item_blocks(0, _recs(raw_lens))
    edges = np.cumsum([0, *raw_lens])
    want = sorted({int(np.searchsorted(edges, x, side="right") - 1)
                   for x in range(start, min(end, total))})
    assert [b.raw_start for b in geo.blocks_for_range(bl, start, end)] == [
        int(edges[i]) for i in want]


def test_block_is_frozen():
    b = Block(0, 1, 1, 0, 0, [1, 1, 0, "r"])
    with pytest.raises(AttributeError):
        b.offset = 5  # type: ignore[misc]
