"""Load planner: DCP's default one plus strict key/shape/dtype checks and safe objects."""

from __future__ import annotations

import dataclasses
import io
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner,
    DefaultSavePlanner,
    create_default_local_load_plan,
    create_default_local_save_plan,
)
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    ReadItem,
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import (
    _compare_save_plans,
    _create_write_item_for_tensor,
)

from ..errors import (
    DtypeMismatchError,
    MissingKeysError,
    SaveFailedError,
    ShapeMismatchError,
    UnexpectedKeysError,
    UnsafeObjectError,
    UnsupportedFormatError,
)
from ..format.dtypes import dtype_name, is_dtype_name
from ..format.keys import is_rank_local, mapping_hint
from .safety import safe_torch_load
from .saved_objects import check_loads_back, serialize


def _fmt_keys(keys: list[str], limit: int = 8) -> str:
    head = ", ".join(repr(k) for k in keys[:limit])
    return head + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


@dataclasses.dataclass(frozen=True)
class CachedPlan:
    """planner_data of a global plan DCP's cache sent empty: how many items it stands for."""

    items: int
    # The full plan, for the coordinator's storage writer in this process (an incremental
    # save compares the state's structure with its base's). Not pickled: the plans DCP
    # scatters to the ranks stay as small as caching made them.
    full: Any = dataclasses.field(default=None, compare=False, repr=False)

    def __reduce__(self) -> tuple:
        return (CachedPlan, (self.items,))


def _group_key(process_group: Any) -> str:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return "local"
    group = process_group if process_group is not None else dist.group.WORLD
    return f"{getattr(group, 'group_name', '')}:{tuple(dist.get_process_group_ranks(group))}"


def _same_properties(plan: SavePlan, cached: SavePlan) -> bool:
    """What DCP's plan comparison leaves out: a dtype or requires_grad change (same shapes)
    would otherwise reuse metadata that names the old dtype."""
    if len(plan.items) != len(cached.items):
        return False
    for a, b in zip(plan.items, cached.items):
        pa = a.tensor_data.properties if a.tensor_data else None
        pb = b.tensor_data.properties if b.tensor_data else None
        if (pa is None) != (pb is None) or (pa is not None and (
                pa.dtype != pb.dtype or pa.requires_grad != pb.requires_grad)):
            return False
    return plan.planner_data == cached.planner_data


def _same_plan(plan: SavePlan, cached: SavePlan) -> bool:
    if len(plan.items) == len(cached.items) and all(
            a is b for a, b in zip(plan.items, cached.items)):
        return plan.planner_data == cached.planner_data  # the items kept: _local_items
    return _compare_save_plans(plan, cached) and _same_properties(plan, cached)


# The write items of the last save's plain tensors, by plan-cache key and key, with
# what they were made from. DCP makes five dataclasses per tensor per save (~8 us);
# the next save of the same structure needs the very same ones.
_ITEMS: dict[str, dict[str, tuple[tuple, WriteItem]]] = {}
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _local_items(cache_key: str, state_dict: dict[str, Any]) -> list[WriteItem]:
    """create_default_local_save_plan's items: plain tensors' from the kept ones while
    everything `_create_write_item_for_tensor` reads of them is unchanged (type, dtype,
    layout, requires_grad, pinned, size); anything else (DTensor, ShardedTensor,
    objects) made by DCP as always."""
    kept = _ITEMS.get(cache_key, {})
    fresh: dict[str, tuple[tuple, WriteItem]] = {}
    items: list[WriteItem] = []
    for fqn, obj in state_dict.items():
        if type(obj) in _PLAIN:
            sig = (type(obj), obj.dtype, obj.layout, obj.requires_grad, obj.is_pinned(),
                   obj.size())
            got = kept.get(fqn)
            item = got[1] if got is not None and got[0] == sig else \
                _create_write_item_for_tensor(fqn, obj)
            fresh[fqn] = (sig, item)
            items.append(item)
        else:
            items += create_default_local_save_plan({fqn: obj}, True).items
    if len(_ITEMS) >= 64:  # one entry per process group and thread that saves
        _ITEMS.clear()
    _ITEMS[cache_key] = fresh
    return items


def forget_plans() -> None:
    """Drop every cached plan of SafeSavePlanner (all groups and threads)."""
    for cache in (SavePlanner._cached_save_plan, SavePlanner._cached_all_plans,
                  SavePlanner._cached_global_plan, SavePlanner._cached_metadata,
                  SavePlanner._cached_final_save_plan):
        for k in [k for k in cache if k.startswith("SafeSavePlanner/")]:
            del cache[k]


class SafeSavePlanner(DefaultSavePlanner):
    """DCP's default save planner that refuses, before anything is written, a value
    that would not load back: shardckpt loads objects under weights_only rules.

    Plan caching (DCP's `enable_plan_caching`) is on: a repeated save of the same
    structure sends empty plans instead of every rank's full plan. DCP keeps its
    cache per planner class; ours is kept per process group and thread, so saves of
    different groups, or a background save beside the training loop's, never
    answer with each other's plans.
    """

    def __init__(self, *, path: str = "", process_group: Any = None,
                 enable_plan_caching: bool = True) -> None:
        super().__init__(enable_plan_caching=enable_plan_caching)
        self.path = path
        self._serialized: dict = {}
        self._cached_plans_key = (f"{type(self).__name__}/{_group_key(process_group)}/"
                                  f"{threading.current_thread().name}")

    def resolve_data(self, write_item: Any) -> Any:
        # Objects were serialized once for the check below; write those bytes.
        data = self._serialized.pop(write_item.index, None)
        return io.BytesIO(data) if data is not None else super().resolve_data(write_item)

    def create_local_plan(self) -> SavePlan:
        # DefaultSavePlanner.create_local_plan, with the write items of plain tensors
        # kept from the last save (_local_items) and DCP's "unchanged" answer also
        # requiring equal dtypes and requires_grad (_same_properties).
        plan = SavePlan(_local_items(self._cached_plans_key, self.state_dict))
        if self.flatten_state_dict:
            plan = dataclasses.replace(plan, planner_data=self.mappings)
        self.plan = out = plan  # the full local plan, also when the answer is "unchanged"
        if self._enable_plan_caching:
            cached = SavePlanner._cached_save_plan.get(self._cached_plans_key)
            if cached is not None and _same_plan(plan, cached):
                out = SavePlan([], usable=False)
            else:
                self._pending_local_plan = plan  # promoted to DCP's cache by finish_plan
        self._serialized.clear()
        for item in plan.items:
            if item.type != WriteItemType.BYTE_IO:
                td = item.tensor_data
                if td is not None and not is_dtype_name(_name_of(td.properties.dtype)):
                    raise UnsupportedFormatError(
                        f"{self.path}: cannot save {item.index.fqn!r}: dtype "
                        f"{td.properties.dtype} has no name in the shardckpt format; cast it "
                        f"(e.g. to uint8 with .view(torch.uint8)) first. Nothing was written.")
                continue
            fqn = item.index.fqn
            try:
                data = serialize(self.lookup_object(item.index))
                self._serialized[item.index] = data
                check_loads_back(data)
            except Exception as e:
                kind = type(self.state_dict.get(fqn)).__name__
                raise UnsafeObjectError(
                    f"{self.path}: cannot save {fqn!r}: a {kind} would not load back (objects "
                    f"load under weights_only rules: tensors, int, float, str, bool, None, list, "
                    f"tuple, dict). Store plain values, or give the object state_dict() / "
                    f"load_state_dict(). Nothing was written.") from e
        return out

    def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Any]:
        key = self._cached_plans_key
        if self._enable_plan_caching and key not in SavePlanner._cached_all_plans and any(
                not p.usable for p in all_plans):
            # A rank answered "unchanged" to a coordinator that has no plan to reuse:
            # DCP would silently plan that rank as empty. Start over on every rank.
            forget_plans()
            raise SaveFailedError(
                f"{self.path}: the ranks' plan caches disagree (a rank restarted?); nothing "
                f"was written. Retry the save: it plans from scratch.")
        delta, metadata = super().create_global_plan(all_plans)
        full = getattr(self, "global_plan", None) or delta
        # DCP sends "unchanged" when the global plan equals its cache, even to a rank
        # that sent its full plan and so has no final plan cached (an earlier save
        # failed between caching on the coordinator and finishing on the rank).
        delta = [f if (a.usable and not d.usable) else d
                 for a, d, f in zip(all_plans, delta, full)]
        # An empty "unchanged" plan tells the storage writer how many items it stands for.
        delta = [d if d.usable else dataclasses.replace(d, planner_data=CachedPlan(len(f.items), f))
                 for d, f in zip(delta, full)]
        return delta, metadata

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        out = super().finish_plan(new_plan)
        if not new_plan.usable and new_plan.storage_data is not None:
            # The cached plan carries the storage data of the save it was made for
            # (its staging directory); this save's arrived with the empty plan.
            out = self.plan = dataclasses.replace(out, storage_data=new_plan.storage_data)
        return out


def _name_of(dtype: torch.dtype) -> str | None:
    try:
        return dtype_name(dtype)
    except TypeError:
        return None


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
        # Keys of the state out of scope (exclude=["model.head.*"] when fine-tuning with a new
        # head) are not loaded: they keep their values, need not be in the checkpoint and may
        # differ in shape.
        skipped = [k for k in self.state_dict if not self._in_scope(k)] if self.scope else []
        for k in skipped:
            del self.state_dict[k]
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
        if skipped:
            # Not super(): DCP reads keys the state lacks as a pre-2.4 checkpoint's and puts
            # every key back (shardckpt checkpoints are never such).
            plan = create_default_local_load_plan(self.state_dict, self.metadata,
                                                  not self.allow_partial_load)
        else:
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
