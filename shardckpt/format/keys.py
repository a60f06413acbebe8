"""The key namespace of a checkpoint: rank-private keys and the one key mapper.

Keys are DCP's flattened names ("train.model.layers.0.weight"). A component
`__rank<N>__` marks state private to rank N (TrainState's RNG streams).

Key mapping (used by load, reshard, convert and diff alike) turns a checkpoint
key into a state key:

1. every `strip_prefix` is removed wherever it starts a key component, i.e. at
   the start of the key or right after a "."; all such occurrences go
   (`a.module.b.module.c` with `module.` -> `a.b.c`). A prefix without a
   trailing "." gets one (`module` means `module.`).
2. then every `rename` rule (regex -> replacement, `re.sub` semantics) is applied,
   in order.

Two checkpoint keys that map to the same state key are an error.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TypeVar

from ..errors import KeyMappingError

RANK_KEY = "__rank{}__"
_RANK_COMPONENT = re.compile(r"(?:^|\.)__rank(\d+)__(?:\.|$)")

KeyMap = Callable[[str], str]
V = TypeVar("V")


def rank_of_key(key: str) -> int | None:
    """N for a key with a `__rank<N>__` component, else None."""
    m = _RANK_COMPONENT.search(key)
    return int(m.group(1)) if m else None


def is_rank_local(key: str) -> bool:
    return _RANK_COMPONENT.search(key) is not None


def is_rank_component(part: str) -> int | None:
    m = re.fullmatch(r"__rank(\d+)__", part)
    return int(m.group(1)) if m else None


def key_mapper(strip_prefix: str | Sequence[str] | None = None,
               rename: Mapping[str, str] | Iterable[tuple[str, str]] | Iterable[str] | None = None,
               ) -> KeyMap | None:
    """The key function for these options, or None when they change nothing.

    `rename` is a {regex: replacement} mapping, (regex, replacement) pairs, or
    "REGEX=REPLACEMENT" strings (the command line's form).
    """
    prefixes = [strip_prefix] if isinstance(strip_prefix, str) else list(strip_prefix or ())
    rules: list[tuple[re.Pattern, str]] = []
    items = rename.items() if isinstance(rename, Mapping) else (rename or ())
    for r in items:
        if isinstance(r, str):
            if "=" not in r:
                raise ValueError(f"rename {r!r}: expected REGEX=REPLACEMENT")
            r = tuple(r.split("=", 1))
        pat, repl = r
        try:
            rules.append((re.compile(pat), repl))
        except re.error as e:
            raise ValueError(f"rename {pat!r}: bad regular expression ({e})") from None
    strips = []
    for p in prefixes:
        if not p:
            continue
        p = p if p.endswith(".") else p + "."
        # "not preceded by anything but a dot": the start of a component
        strips.append(re.compile(r"(?<![^.])" + re.escape(p)))
    if not strips and not rules:
        return None

    def fn(key: str) -> str:
        for s in strips:
            key = s.sub("", key)
        for pat, repl in rules:
            key = pat.sub(repl, key)
        return key

    return fn


def map_keys(entries: Mapping[str, V], key_map: KeyMap | None) -> dict[str, V]:
    """`entries` under mapped keys; two keys mapping to one is an error naming both."""
    if key_map is None:
        return dict(entries)
    out: dict[str, V] = {}
    origin: dict[str, str] = {}
    for k, v in entries.items():
        nk = key_map(k)
        if nk in out:
            raise KeyMappingError(f"key mapping sends both {origin[nk]!r} and {k!r} to "
                                  f"{nk!r}; adjust strip_prefix / rename")
        out[nk] = v
        origin[nk] = k
    return out


def prefix_hint(wanted: Iterable[str], stored: Iterable[str]) -> str | None:
    """A strip_prefix that would make most wanted keys match stored ones, if one does."""
    wanted, stored = set(wanted), set(stored)
    best: tuple[int, str] | None = None
    candidates: set[str] = set()
    for k in stored:
        parts = k.split(".")
        for i in range(1, min(len(parts), 4)):
            candidates.add(".".join(parts[:i]) + ".")
    for p in candidates:
        fn = key_mapper(p)
        hits = len(wanted & {fn(k) for k in stored}) if fn else 0
        if hits and (best is None or hits > best[0]):
            best = (hits, p)
    return None if best is None or best[0] <= len(wanted & stored) else best[1]


# Wrapper modules that insert a component into every key below them.
WRAPPER_COMPONENTS = ("module.", "_orig_mod.", "_fsdp_wrapped_module.",
                      "_checkpoint_wrapped_module.")


class AmbiguousKeysError(ValueError):
    """A model's keys fit a checkpoint under more than one prefix equally well."""


def _prefix_hits(stored: list[str], wanted: set[str], norm: KeyMap) -> dict[str, int]:
    """For each prefix: how many stored keys, once normalized, are a wanted key under it."""
    counts: dict[str, int] = {}
    for k in stored:
        n = norm(k)
        for i in [0] + [j + 1 for j, c in enumerate(n) if c == "."]:
            if n[i:] in wanted:
                counts[n[:i]] = counts.get(n[:i], 0) + 1
    return counts


def model_key_map(wanted: Iterable[str], stored: Iterable[str]) -> tuple[KeyMap, str, int]:
    """A key function that finds a model's keys inside any checkpoint layout.

    The model's keys (`wanted`) may sit under a prefix (`train.model.`, `model.`)
    and behind wrappers (`module.`, `_orig_mod.`). Returns (key map, prefix,
    number of wanted keys found): stored keys of the model map to the model's
    keys; every other stored key maps to a name no model key has.
    """
    wanted = set(wanted)
    stored = list(stored)
    unwrap = key_mapper(WRAPPER_COMPONENTS)
    best: tuple[int, str, KeyMap | None] = (0, "", None)
    for norm in (lambda k: k, unwrap):
        counts = _prefix_hits(stored, wanted, norm)
        for prefix, hits in counts.items():
            if hits > best[0] or (hits == best[0] and best[2] is not None
                                  and len(prefix) < len(best[1])):
                best = (hits, prefix, norm)
        if best[0] == len(wanted):
            break
    hits, prefix, norm = best
    if norm is None:
        return (lambda k: "\0" + k), "", 0
    tied = sorted(p for p, h in _prefix_hits(stored, wanted, norm).items() if h == hits)
    if len(tied) > 1 and len({len(p) for p in tied}) == 1:
        # Two submodules that fit equally (`0.` and `2.` of a Sequential): the shorter-prefix
        # rule cannot choose, and loading either silently would load the wrong weights.
        raise AmbiguousKeysError(
            f"the model's keys fit the checkpoint under {len(tied)} prefixes equally "
            f"({', '.join(repr(p) for p in tied[:4])}); choose one: sd = model.state_dict(); "
            f"shardckpt.load(sd, path, strip_prefix={tied[0]!r}, strict=False); "
            f"model.load_state_dict(sd)")

    def fn(key: str) -> str:
        n = norm(key)
        if n.startswith(prefix) and n[len(prefix):] in wanted:
            return n[len(prefix):]
        return "\0" + key  # not the model's: out of every state key's way

    return fn, prefix, hits


def mapping_hint(wanted: Iterable[str], stored: Iterable[str]) -> str | None:
    """The strip_prefix / rename that would map most stored keys onto wanted ones, as
    advice ("pass strip_prefix='module.'"), or None when no prefix change helps.

    Matches keys by their common tail (whole components) and counts the most
    frequent pair (stored prefix, wanted prefix).
    """
    wanted, stored = set(wanted), set(stored)
    by_tail: dict[str, set[str]] = {}
    for s in stored:
        for i in [0] + [j + 1 for j, c in enumerate(s) if c == "."]:
            by_tail.setdefault(s[i:], set()).add(s[:i])
    counts: dict[tuple[str, str], int] = {}
    for w in wanted:
        for i in [0] + [j + 1 for j, c in enumerate(w) if c == "."]:
            for sp in by_tail.get(w[i:], ()):
                if (sp, w[:i]) != ("", ""):
                    counts[(sp, w[:i])] = counts.get((sp, w[:i]), 0) + 1
    if not counts:
        return None
    (sp, wp), hits = max(counts.items(), key=lambda kv: (kv[1], -len(kv[0][0]) - len(kv[0][1])))
    if hits <= len(wanted & stored):
        return None
    if not wp:
        return f"pass strip_prefix={sp!r}"
    if not sp:
        return f"pass rename={{'^': {wp!r}}}"
    return f"pass rename={{{'^' + re.escape(sp)!r}: {wp!r}}}"
