"""Load planner: DCP's default one plus strict key/shape/dtype checks and safe objects."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, ReadItem, SavePlan, WriteItemType

from ..errors import (
    DtypeMismatchError,
    MissingKeysError,
    ShapeMismatchError,
    UnexpectedKeysError,
    UnsafeObjectError,
)
from ..format.keys import is_rank_local, mapping_hint
from .safety import safe_torch_load, weights_only_load


def _fmt_keys(keys: list[str], limit: int = 8) -> str:
    head = ", ".join(repr(k) for k in keys[:limit])
    return head + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


class SafeSavePlanner(DefaultSavePlanner):
    """DCP's default save planner that refuses, before anything is written, a value
    that would not load back: shardckpt loads objects under weights_only rules."""

    def __init__(self, *, path: str = "") -> None:
        super().__init__()
        self.path = path
        self._serialized: dict = {}

    def resolve_data(self, write_item: Any) -> Any:
        # Objects were serialized once for the check below; write those bytes.
        data = self._serialized.pop(write_item.index, None)
        return io.BytesIO(data) if data is not None else super().resolve_data(write_item)

    def create_local_plan(self) -> SavePlan:
        plan = super().create_local_plan()
        self._serialized.clear()
        for item in plan.items:
            if item.type != WriteItemType.BYTE_IO:
                continue
            fqn = item.index.fqn
            try:
                data = super().resolve_data(item).getvalue()
                self._serialized[item.index] = data
                weights_only_load(io.BytesIO(data))
            except Exception as e:
                kind = type(self.state_dict.get(fqn)).__name__
                raise UnsafeObjectError(
                    f"{self.path}: cannot save {fqn!r}: a {kind} would not load back (objects "
                    f"load under weights_only rules: tensors, int, float, str, bool, None, list, "
                    f"tuple, dict). Store plain values, or give the object state_dict() / "
                    f"load_state_dict(). Nothing was written.") from e
        return plan


def key_hint(wanted: list[str], stored: list[str]) -> str:
    """A strip_prefix / rename that would make the keys match, as advice, or ""."""
    hint = mapping_hint(wanted, stored)
    return f" The keys differ by a prefix: {hint}." if hint else ""


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner plus strict key/shape/dtype checks and safe objects.

    `scope(key)` (checkpoint keys, after key mapping) says which checkpoint keys
    this load is about: keys out of scope are never "unexpected" (partial loads:
    include/exclude, load_model). After planning, `missing` and `unexpected`
    hold what strict mode would have refused.
    """

    def __init__(self, *, strict: bool = True, path: str = "",
                 scope: Callable[[str], bool] | None = None) -> None:
        super().__init__(allow_partial_load=not strict)
        self.strict = strict
        self.path = path
        self.scope = scope
        self.missing: list[str] = []
        self.unexpected: list[str] = []

    def _in_scope(self, key: str) -> bool:
        return self.scope is None or self.scope(key)

    def create_local_plan(self) -> LoadPlan:
        md = self.metadata.state_dict_metadata
        missing = self.missing = sorted(k for k in self.state_dict if k not in md)
        self.unexpected = sorted(k for k in md if k not in self.state_dict
                                 and self._in_scope(k) and not is_rank_local(k))
        if missing and self.strict:
            raise MissingKeysError(
                f"{self.path}: {len(missing)} key(s) of the state are not in the checkpoint: "
                f"{_fmt_keys(missing)}.{key_hint(missing, list(md))} Otherwise check that the "
                f"model matches the checkpoint, or pass strict=False to load the keys that "
                f"exist (a report says what was not loaded).")
        for fqn, obj in self.state_dict.items():
            m = md.get(fqn)
            if m is None:
                continue
            if isinstance(m, TensorStorageMetadata):
                if not isinstance(obj, torch.Tensor):
                    raise ShapeMismatchError(
                        f"{self.path}: {fqn!r} is a tensor {list(m.size)} in the checkpoint but "
                        f"{type(obj).__name__} in the state to load into.")
                if tuple(obj.shape) != tuple(m.size):
                    raise ShapeMismatchError(
                        f"{self.path}: {fqn!r} has shape {list(m.size)} in the checkpoint but "
                        f"{list(obj.shape)} in the state to load into. Build the model with the "
                        f"same configuration as at save time.")
                if self.strict and obj.dtype != m.properties.dtype:
                    raise DtypeMismatchError(
                        f"{self.path}: {fqn!r} is {m.properties.dtype} in the checkpoint but "
                        f"{obj.dtype} in the state to load into. Cast the model first, or pass "
                        f"strict=False to convert on load.")
            elif isinstance(m, BytesStorageMetadata) and isinstance(obj, torch.Tensor):
                raise ShapeMismatchError(
                    f"{self.path}: {fqn!r} is a non-tensor object in the checkpoint but a tensor "
                    f"in the state to load into.")
        plan = super().create_local_plan()
        # Tell the coordinator which keys this rank asked for, so it can find
        # checkpoint keys that no rank wants (strict "unexpected keys").
        return dataclasses.replace(plan, planner_data=sorted(self.state_dict))

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        if self.strict:
            wanted: set[str] = set()
            for p in global_plan:
                wanted.update(p.planner_data or ())
            # A vanished rank's private keys are expected after a resize.
            unexpected = sorted(k for k in self.metadata.state_dict_metadata
                                if k not in wanted and not is_rank_local(k)
                                and self._in_scope(k))
            if unexpected:
                raise UnexpectedKeysError(
                    f"{self.path}: {len(unexpected)} key(s) of the checkpoint are not in the "
                    f"state to load into: {_fmt_keys(unexpected)}. Check that the model matches "
                    f"the checkpoint, load a part with include=/exclude= (globs), only the "
                    f"model with shardckpt.load_model, or pass strict=False to ignore them.")
        return super().create_global_plan(global_plan)

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        obj = safe_torch_load(value, path=self.path, key=read_item.dest_index.fqn)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj
