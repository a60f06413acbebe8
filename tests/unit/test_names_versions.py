"""Names (shardckpt/format/names.py, shardckpt/manager/names.py) and versions/migrations."""

from __future__ import annotations

import pytest

from shardckpt.format import names
from shardckpt.format import versions as ver
from shardckpt.format.names import (
    MAX_NAME_LEN,
    Leftover,
    data_file_name,
    is_data_file_name,
    parse_leftover,
    staging_name,
    trash_name,
)
from shardckpt.manager import names as mnames

TOKEN = "0123456789ab"

# ------------------------------------------------------------------ manager step names


@pytest.mark.parametrize("step,name", [
    (0, "step_00000000"), (120, "step_00000120"), (99999999, "step_99999999"),
    (123456789, "step_123456789"),
])
def test_step_dir_name(step, name):
    assert mnames.step_dir_name(step) == name
    assert mnames.parse_step(name) == step


@pytest.mark.parametrize("name,step", [
    ("step_00000120", 120), ("step120", 120), ("step-120", 120), ("step_120", 120),
    ("step0", 0), ("step_0000", 0),
    ("step_x", None), ("mystep_1", None), ("step", None), ("step_", None), ("step__1", None),
    ("step_-1", None), ("step_1a", None), ("step_1.5", None), ("Step_1", None),
    ("xstep_1", None), ("step 1", None), ("step_1/", None), ("", None),
    (None, None), (12, None),
])
def test_parse_step(name, step):
    assert mnames.parse_step(name) == step


@pytest.mark.parametrize("name", ["step_1\n", "step_\u0661\u0662"])
def test_parse_step_rejects_trailing_newline_and_non_ascii_digits(name):
    assert mnames.parse_step(name) is None


def test_parse_leftover_in_root():
    assert mnames.parse_leftover_in_root(f".step_00000010.partial-{TOKEN}") == (
        "step_00000010", Leftover.PARTIAL)
    assert mnames.parse_leftover_in_root(f".step-7.old-{TOKEN}") == ("step-7", Leftover.OLD)
    assert mnames.parse_leftover_in_root(f".best.partial-{TOKEN}") is None
    assert mnames.parse_leftover_in_root("step_00000010") is None


# ------------------------------------------------------------------ leftovers


@pytest.mark.parametrize("final", ["ck", "a.b", "step_00000001", "x" * MAX_NAME_LEN, ".hidden"])
def test_staging_and_trash_names_round_trip(final):
    assert staging_name(final, TOKEN) == f".{final}.partial-{TOKEN}"
    assert trash_name(final, TOKEN) == f".{final}.old-{TOKEN}"
    assert parse_leftover(staging_name(final, TOKEN)) == (final, Leftover.PARTIAL)
    assert parse_leftover(trash_name(final, TOKEN)) == (final, Leftover.OLD)


@pytest.mark.parametrize("name", [
    "ck", f"ck.partial-{TOKEN}", f".ck.partial-{TOKEN[:-1]}", f".ck.partial-{TOKEN}0",
    f".ck.partial-{TOKEN.upper()}", ".ck.partial-0123456789ag", f"..partial-{TOKEN}",
    f".ck.partial{TOKEN}", f".ck-partial-{TOKEN}", f".ck.old-{TOKEN[:-1]}", f".ck.older-{TOKEN}",
    ".ck.partial-", "",
])
def test_parse_leftover_rejects(name):
    assert parse_leftover(name) is None


def test_max_name_len_fits_name_max():
    assert MAX_NAME_LEN == 233
    longest = staging_name("n" * MAX_NAME_LEN, "f" * 12)
    assert len(longest.encode()) == 255
    assert len(trash_name("n" * MAX_NAME_LEN, "f" * 12).encode()) <= 255
    assert len(staging_name("n" * (MAX_NAME_LEN + 1), "f" * 12).encode()) == 256


# ------------------------------------------------------------------ data file names


@pytest.mark.parametrize("rank,name", [(0, "data/r00000.bin"), (3, "data/r00003.bin"),
                                       (123456, "data/r123456.bin")])
def test_data_file_name(rank, name):
    assert data_file_name(rank) == name
    assert is_data_file_name(name)


@pytest.mark.parametrize("rel", [
    "data/r00000.bin", "data/x", "data/_a", "data/a-b.c", "data/A.B_c-1", "data/a.",
    "data/" + "a" * 201,
])
def test_is_data_file_name_accepts(rel):
    assert is_data_file_name(rel)


@pytest.mark.parametrize("rel", [
    "data/" + "a" * 202, "../x", "/etc/passwd", "data/../x", "data/..", "data/.", "data/.hidden",
    "data/-x", "data/a/b", "data//x", "data/", "data", "r00000.bin", "data/a..b", "data\\x",
    "data/a\\b", "data/ x", "data/a b", "Data/x", "./data/x", "/data/x", "data/x\x00",
    "data/\u00e9", "", None, 1, b"data/x",
])
def test_is_data_file_name_rejects(rel):
    assert not is_data_file_name(rel)


def test_is_data_file_name_rejects_trailing_newline():
    assert not is_data_file_name("data/r00000.bin\n")


def test_format_names_constants():
    assert names.MANIFEST_NAME == "manifest.json"
    assert names.DATA_DIR == "data"
    assert names.PARTIAL_MARKER == "PARTIAL.json"
    assert names.FORMAT_NAME == "shardckpt"


# ------------------------------------------------------------------ versions


def test_format_version_is_3():
    assert ver.FORMAT_VERSION == 3


def test_every_older_version_has_a_migration():
    assert set(ver.MIGRATIONS) == set(range(1, ver.FORMAT_VERSION))
    for v, fn in ver.MIGRATIONS.items():
        assert fn({"format_version": v, "x": [1]})["format_version"] == v + 1


def test_migrate_v1_to_current():
    d = {"format": "shardckpt", "format_version": 1, "world_size": 2, "tensors": {"a": 1}}
    out = ver.migrate(d)
    assert out == {"format": "shardckpt", "format_version": 3, "world_size": 2,
                   "tensors": {"a": 1}, "bases": {}}
    assert d["format_version"] == 1  # the input is not modified


def test_migrate_current_is_unchanged():
    d = {"format_version": ver.FORMAT_VERSION, "k": "v"}
    assert ver.migrate(d) == {"format_version": ver.FORMAT_VERSION, "k": "v"}
