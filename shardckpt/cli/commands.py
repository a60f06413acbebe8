"""The commands of `shardckpt`: each calls one library function and returns
(exit status, text for stdout); `shardckpt.cli.main` prints it and maps errors."""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from collections.abc import Callable
from typing import Any

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2

Result = tuple[int, str]  # (exit status, what to print on stdout)


class UsageError(Exception):
    """A combination of flags that makes no sense: exit 2."""


def _out(args: argparse.Namespace, obj: Any, text: Callable[[], str]) -> str:
    from ..tools.report import to_json

    if getattr(args, "json", False):
        return to_json(obj)
    return "" if getattr(args, "quiet", False) else text()


def _bar(args: argparse.Namespace, total: int | None, desc: str) -> Any:
    from ..tools.report import Progress

    return Progress(total, desc, enabled=not args.quiet)


# ---------------------------------------------------------------- commands


def cmd_ls(args: argparse.Namespace) -> Result:
    from ..tools.ls import ls

    rep = ls(args.root)
    return EXIT_OK, _out(args, rep, lambda: str(rep))


def cmd_inspect(args: argparse.Namespace) -> Result:
    from ..tools.inspect import format_inspect, inspect_path

    info = inspect_path(args.path, source_format=args.from_format,
                        trust_pickle=args.trust_pickle)
    return EXIT_OK, _out(args, info, lambda: format_inspect(info, max_keys=args.max_keys))


def cmd_verify(args: argparse.Namespace) -> Result:
    from ..tools.report import verify_text
    from ..tools.verify import verify

    kwargs: dict[str, Any] = {}
    if "on_progress" in inspect.signature(verify).parameters:  # a verify with a callback
        from ..io.reader import read_manifest

        bar = _bar(args, sum(f.size for f in read_manifest(args.path).files.values()), "verify")
        kwargs["on_progress"] = bar
    else:
        bar = _bar(args, None, "verify")  # indeterminate: verify reports no progress
    with bar:
        rep = verify(args.path, deep=args.deep, threads=args.threads, raise_on_error=False,
                     **kwargs)

    def text() -> str:
        t = verify_text(rep)
        return t if rep.ok else t + "\nLoad an earlier checkpoint; this one cannot be trusted."
    return (EXIT_OK if rep.ok else EXIT_FAIL), _out(args, rep, text)


def cmd_audit(args: argparse.Namespace) -> Result:
    from ..tools.audit import audit

    rep = audit(args.path, prefix=args.prefix)
    return (EXIT_OK if rep.ok else EXIT_FAIL), _out(args, rep, lambda: str(rep))


def cmd_diff(args: argparse.Namespace) -> Result:
    from ..tools.diff import check_model, diff_checkpoints, is_model_target

    if is_model_target(args.b):
        if args.strip_prefix or args.rename:
            raise UsageError("--strip-prefix / --rename compare two checkpoints; with "
                             "module:function use --prefix")
        rep: Any = check_model(args.a, args.b, prefix=args.prefix, trust_pickle=args.trust_pickle)
        return (EXIT_OK if rep.ok else EXIT_FAIL), _out(args, rep, lambda: str(rep))
    total = None
    if not args.keys_only and not args.quiet and sys.stderr.isatty():
        from ..tools.sources import open_source

        with open_source(args.a, trust_pickle=args.trust_pickle) as s:
            total = sum(e.nbytes for e in s.entries.values())
    with _bar(args, total, "diff") as bar:
        rep = diff_checkpoints(args.a, args.b, values=not args.keys_only, on_progress=bar,
                               trust_pickle=args.trust_pickle,
                               strip_prefix=args.strip_prefix or (), rename=args.rename or ())
    return (EXIT_OK if rep.same else EXIT_FAIL), _out(args, rep, lambda: str(rep))


def cmd_reshard(args: argparse.Namespace) -> Result:
    from ..tools.report import human_bytes, plural
    from ..tools.reshard import reshard, total_bytes
    from ..tools.sources import ShardSource

    with ShardSource(args.src) as s:
        total = total_bytes(s)
    t0 = time.perf_counter()
    with _bar(args, total, "reshard") as bar:
        m = reshard(args.src, args.dst, args.world_size, compression=args.compression,
                    min_split_bytes=args.min_split_bytes, overwrite=args.overwrite,
                    on_progress=bar)
    secs = time.perf_counter() - t0
    r = {"src": args.src, "dst": args.dst, "world_size": args.world_size,
         "tensors": len(m.tensors), "objects": len(m.objects), "files": len(m.files),
         "bytes_on_disk": sum(f.size for f in m.files.values()), "seconds": secs}
    return EXIT_OK, _out(args, r, lambda: (
        f"{args.dst}: {plural(r['tensors'], 'tensor')}, {plural(r['objects'], 'object')} in "
        f"{plural(r['files'], 'file')} for world size {args.world_size}, "
        f"{human_bytes(r['bytes_on_disk'])} on disk, {secs:.1f}s"))


# Flags of the format-aware convert: passed only when set, so a convert without them
# (an older tools.convert) keeps working.
_CONVERT_EXTRA = (("model_only", "--model-only"), ("include", "--include"),
                  ("exclude", "--exclude"), ("dtype", "--dtype"),
                  ("max_shard_size", "--max-shard-size"), ("train_state", "--train-state"))


def convert_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of `tools.convert.convert` for these flags (only those set)."""
    kw: dict[str, Any] = dict(
        source_format=args.from_format, strip_prefix=tuple(args.strip_prefix or ()),
        rename=tuple(args.rename or ()), world_size=args.world_size,
        compression=args.compression, overwrite=args.overwrite, trust_pickle=args.trust_pickle)
    for name, _flag in _CONVERT_EXTRA:
        v = getattr(args, name)
        if v not in (None, False, [], ()):
            kw[name] = tuple(v) if isinstance(v, list) else v
    return kw


def cmd_convert(args: argparse.Namespace) -> Result:
    from ..tools import convert as conv
    from ..tools.report import human_bytes, plural, refuse_special
    from ..tools.sources import open_source

    kw = convert_kwargs(args)
    params = inspect.signature(conv.convert).parameters
    lacking = [flag for name, flag in _CONVERT_EXTRA if name in kw and name not in params]
    if lacking:
        raise ValueError(f"{', '.join(lacking)}: not supported by this shardckpt's convert "
                         f"(upgrade shardckpt)")
    refuse_special(args.src)
    total = None
    if not args.quiet and sys.stderr.isatty():
        with open_source(args.src, args.from_format, trust_pickle=args.trust_pickle) as s:
            total = sum(e.nbytes for e in s.entries.values())
    t0 = time.perf_counter()
    with _bar(args, total, f"convert to {args.to}") as bar:
        r = conv.convert(args.src, args.dst, args.to, on_progress=bar, **kw)
    r = dict(r.to_dict() if hasattr(r, "to_dict") else r)
    r.update(src=args.src, dst=args.dst, seconds=time.perf_counter() - t0)
    if not args.json and not args.quiet:
        for k in r.get("skipped", ()):
            print(f"shardckpt convert: skipped object {k!r}: safetensors stores only tensors "
                  f"and JSON values", file=sys.stderr)
    return EXIT_OK, _out(args, r, lambda: (
        f"{args.src} ({r.get('source_format')}) -> {args.dst} ({args.to}): "
        f"{plural(r.get('tensors', 0), 'tensor')}, {plural(r.get('objects', 0), 'object')}, "
        f"{human_bytes(r.get('bytes', 0))}, {r['seconds']:.1f}s"))


def cmd_migrate(args: argparse.Namespace) -> Result:
    from ..tools.migrate import migrate

    rep = migrate(args.path, dry_run=args.dry_run)
    return EXIT_OK, _out(args, rep, lambda: str(rep))


def cmd_gc(args: argparse.Namespace) -> Result:
    from ..tools.gc import gc
    from ..tools.report import gc_text, gc_to_dict

    rep = gc(args.root, keep_last=args.keep_last, older_than=args.older_than,
             dry_run=args.dry_run)
    return EXIT_OK, _out(args, gc_to_dict(rep), lambda: gc_text(rep))


def cmd_materialize(args: argparse.Namespace) -> Result:
    from ..tools.materialize import materialize

    rep = materialize(args.path, args.out, overwrite=args.overwrite)
    return EXIT_OK, _out(args, rep.to_dict(), lambda: str(rep))


def cmd_bench(args: argparse.Namespace) -> Result:
    from ..tools.bench import format_bench, run_bench

    with _bar(args, None, "bench"):
        r = run_bench(args.size_mb, directory=args.dir, threads=args.threads)
    return EXIT_OK, _out(args, r, lambda: format_bench(r))
