"""Files in a checkpoint directory that shardckpt did not write, kept across a save.

DCP writes into a directory and leaves whatever else is there; users put files
next to a checkpoint (a `dcp_to_torch_save` export, notes, a config). A save that
replaces the directory by an atomic swap must not delete them: before the swap
they are hard-linked into the new directory, so at every moment each of them
exists under the checkpoint's path (in the old directory or the new one), and a
crash in between loses nothing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import uuid

from ..errors import CheckpointExistsError, SaveFailedError
from ..format.names import (
    DATA_DIR,
    MANIFEST_NAME,
    PARTIAL_MARKER,
    RETIRED_MANIFEST,
    is_data_file_name,
    parse_temp,
)
from .fsutil import fsync_dir
from .storage import MAX_MANIFEST_BYTES

OURS = frozenset({MANIFEST_NAME, DATA_DIR, PARTIAL_MARKER})
log = logging.getLogger("shardckpt")


def check_target(final: str, committed: bool) -> None:
    """Raise if `final` cannot take a checkpoint without clobbering something."""
    try:
        st = os.lstat(final)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        raise CheckpointExistsError(
            f"{final}: exists and is not a directory (a file or a link); refusing to replace "
            f"it. Choose another path or remove it.")
    if committed:
        return
    taken = sorted(n for n in os.listdir(final) if n in OURS)
    if taken:
        raise CheckpointExistsError(
            f"{final}: holds {', '.join(repr(n) for n in taken)}, which shardckpt did not write "
            f"but would need for its own files; refusing to save there. Choose another path "
            f"or move them.")


def _link_tree(src: str, dst: str) -> int:
    st = os.lstat(src)
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), dst)
        return 1
    if stat.S_ISDIR(st.st_mode):
        os.mkdir(dst, stat.S_IMODE(st.st_mode))
        return sum(_link_tree(os.path.join(src, n), os.path.join(dst, n)) for n in os.listdir(src))
    os.link(src, dst, follow_symlinks=False)
    return 1


def carry_into(final: str, staging: str, own_data: set[str] | None) -> int:
    """Hard-link every entry of `final` that is not the checkpoint's into `staging`.

    `own_data`: the data files the old manifest names (the rest of data/ is
    foreign), or None when `final` holds no committed checkpoint (then data/ is
    not expected at all). Returns the number of entries carried.
    """
    n = 0
    for name in os.listdir(final):
        if name in OURS:
            continue
        n += _link_tree(os.path.join(final, name), os.path.join(staging, name))
    data = os.path.join(final, DATA_DIR)
    if own_data is not None and os.path.isdir(data) and not os.path.islink(data):
        for name in os.listdir(data):
            if f"{DATA_DIR}/{name}" in own_data:
                continue
            dst = os.path.join(staging, DATA_DIR, name)
            if os.path.lexists(dst):
                raise SaveFailedError(
                    f"{final}: {DATA_DIR}/{name} was not written by shardckpt but has the name of "
                    f"a new data file; nothing was committed. Move it and retry.")
            n += _link_tree(os.path.join(data, name), dst)
    return n


def _foreign_entries(ckpt: str) -> list[str]:
    """Entries (relative paths) of checkpoint directory `ckpt` that shardckpt did not write."""
    ours = OURS | {RETIRED_MANIFEST}
    out = [n for n in sorted(os.listdir(ckpt)) if n not in ours and parse_temp(n) is None]
    data = os.path.join(ckpt, DATA_DIR)
    if os.path.isdir(data) and not os.path.islink(data):
        own = _named_files(ckpt)
        out += [f"{DATA_DIR}/{n}" for n in sorted(os.listdir(data)) if parse_temp(n) is None
                and not (f"{DATA_DIR}/{n}" in own if own is not None else _RANK_FILE.fullmatch(n))]
    return out


_RANK_FILE = re.compile(r"r[0-9]{5,}\.bin")


def _named_files(ckpt: str) -> set[str] | None:
    """The data files the checkpoint's manifest (live or retired) names; None if unreadable."""
    for name in (MANIFEST_NAME, RETIRED_MANIFEST):
        try:
            with open(os.path.join(ckpt, name), "rb") as f:
                files = json.loads(f.read(MAX_MANIFEST_BYTES)).get("files")
            if isinstance(files, dict):
                return {k for k in files if is_data_file_name(k)}
        except (OSError, ValueError, AttributeError):
            continue
    return None


def remove_checkpoint_dir(path: str, trash: str) -> bool:
    """Delete the checkpoint at `path` (retention, gc) and nothing a user put in it.

    The rename to `trash` is the claim and makes it invisible at once (of two deleters,
    or a deleter and a publisher, one rename wins). Entries shardckpt did not write (an
    eval report, an export, notes) then move back, each by one rename, into a directory
    at `path`: a crash loses none of them from both places. False if `path` was gone.
    """
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return False
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    try:
        foreign = _foreign_entries(trash)
    except OSError:
        foreign = []
    if foreign:
        try:
            os.mkdir(path, stat.S_IMODE(os.stat(trash).st_mode))
        except FileExistsError:
            pass  # a save published there since: the files join it
        for rel in foreign:
            dst = os.path.join(path, rel)
            if os.path.dirname(rel):
                os.makedirs(os.path.dirname(dst), exist_ok=True)
            if os.path.lexists(dst):  # the new checkpoint has that name: keep both
                dst += f".kept-{uuid.uuid4().hex[:6]}"
            os.rename(os.path.join(trash, rel), dst)
        fsync_dir(path)
        log.warning("shardckpt: deleted the checkpoint %s and kept what shardckpt did not "
                    "write there: %s", path, ", ".join(foreign))
    shutil.rmtree(trash, ignore_errors=True)
    return True
