"""Reference counting over a root: dropping a checkpoint never breaks one that references it.

An incremental checkpoint references blocks of sibling checkpoints (its `bases`).
Retention and gc drop a checkpoint through `drop`: one that no live checkpoint
references is deleted (renamed to a trash name, then removed); one that a live
checkpoint still references is *retired*: its manifest is renamed to
`manifest.retired.json` in one atomic rename, so it is no longer a committed
checkpoint (not listed, not `latest`, not restorable) while its data files stay
for the checkpoints that reference them. `sweep` deletes retired checkpoints
once nothing live references them. Every step is a single rename, so a kill at
any moment leaves every committed checkpoint loadable.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from ..errors import ShardckptError
from ..format.names import MANIFEST_NAME, RETIRED_MANIFEST
from ..io.base_index import holder_names
from ..io.committed import read_committed
from ..io.fsutil import fsync_dir
from ..io.storage import is_url, join, storage_for
from .catalog import delete_checkpoint, step_entries


@dataclass
class References:
    """Who references whom among the live (committed) checkpoints of a root."""

    users: dict[str, set[str]] = field(default_factory=dict)  # name -> live names using it
    uses: dict[str, set[str]] = field(default_factory=dict)  # live name -> names it uses
    unreadable: set[str] = field(default_factory=set)  # live, manifest unreadable: unknown

    def users_of(self, name: str) -> set[str]:
        return self.users.get(name, set()) - {name}

    def forget(self, name: str) -> None:
        """`name` is no longer live (retired or deleted): what it references, it no longer
        holds alive (a retired checkpoint's users reference the holders directly)."""
        for h in self.uses.pop(name, set()):
            self.users.get(h, set()).discard(name)
        self.unreadable.discard(name)

    def may_be_used(self, name: str) -> bool:
        """True unless it is known that no other live checkpoint references `name`."""
        return bool(self.users_of(name)) or bool(self.unreadable - {name})


def references(root: str) -> References:
    refs = References()
    for _, name in step_entries(root):
        path = join(root, name)
        if not storage_for(path).is_committed(path):
            continue
        try:
            holders = holder_names(read_committed(path))
        except (ShardckptError, OSError):
            # A manifest we cannot read may reference anything: nothing it might
            # use is deleted until it is readable again or itself gone.
            refs.unreadable.add(name)
            continue
        refs.uses[name] = holders
        for h in holders:
            refs.users.setdefault(h, set()).add(name)
    return refs


def is_retired(root: str, name: str) -> bool:
    path = join(root, name)
    if is_url(path):
        return storage_for(path).is_retired(path)
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return False
        os.lstat(os.path.join(path, MANIFEST_NAME))
        return False
    except FileNotFoundError:
        pass
    except OSError:
        return False
    try:
        return stat.S_ISREG(os.lstat(os.path.join(path, RETIRED_MANIFEST)).st_mode)
    except OSError:
        return False


def retired_names(root: str) -> list[str]:
    return [name for _, name in step_entries(root) if is_retired(root, name)]


def retire(root: str, name: str) -> None:
    path = join(root, name)
    if is_url(path):
        storage_for(path).retire(path)
        return
    os.rename(os.path.join(path, MANIFEST_NAME), os.path.join(path, RETIRED_MANIFEST))
    fsync_dir(path)


def drop(root: str, name: str, refs: References | None = None) -> str | None:
    """Retention's delete: "deleted", "retired" (still referenced), or None (already gone)."""
    refs = references(root) if refs is None else refs
    if refs.may_be_used(name):
        try:
            retire(root, name)
        except FileNotFoundError:
            return None
        outcome = "retired"
    else:
        outcome = "deleted" if delete_checkpoint(root, name) else None
    refs.forget(name)  # a caller dropping several in turn keeps one References up to date
    return outcome


def sweep(root: str, protected: set[str] = frozenset(), refs: References | None = None,
          ) -> list[str]:
    """Delete retired checkpoints that no live checkpoint references any more."""
    return [n for n in sweepable(root, protected, refs) if delete_checkpoint(root, n)]


def sweepable(root: str, protected: set[str] = frozenset(), refs: References | None = None,
              ) -> list[str]:
    """The retired checkpoints `sweep` would delete (what `gc --dry-run` reports)."""
    retired = [n for n in retired_names(root) if n not in protected]
    if not retired:
        return []
    refs = references(root) if refs is None else refs
    return [n for n in retired if not refs.may_be_used(n)]


def release(root: str, name: str) -> list[str]:
    """Make `name` unreferenced before it is overwritten: every live checkpoint that
    references it is rewritten standalone (`materialize`), referencers first."""
    from ..tools.materialize import materialize

    done: list[str] = []
    for _ in range(10_000):  # references form a DAG; this bound only stops a cycle
        refs = references(root)
        users = sorted(refs.users_of(name))
        if not users:
            return done
        # One that nothing references can be rewritten without breaking another.
        free = [u for u in users if not refs.users_of(u)] or users
        materialize(join(root, free[0]), force=True)
        done.append(free[0])
    raise ShardckptError(f"{root}: references to {name} do not resolve (a cycle); rewrite the "
                         f"checkpoints that reference it with `shardckpt materialize`.")
