"""Files in a checkpoint directory that shardckpt did not write, kept across a save.

DCP writes into a directory and leaves whatever else is there; users put files
next to a checkpoint (a `dcp_to_torch_save` export, notes, a config). A save that
replaces the directory by an atomic swap must not delete them: before the swap
they are hard-linked into the new directory, so at every moment each of them
exists under the checkpoint's path (in the old directory or the new one), and a
crash in between loses nothing.
"""

from __future__ import annotations

import os
import stat

from ..errors import CheckpointExistsError, SaveFailedError
from ..format.names import DATA_DIR, MANIFEST_NAME, PARTIAL_MARKER

OURS = frozenset({MANIFEST_NAME, DATA_DIR, PARTIAL_MARKER})


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
