"""The `shardckpt` command line: thin argparse wrappers over library functions.

Exit status: 0 success / clean, 1 a failed check or a failed operation,
2 bad usage. Errors are one line: what is wrong and what to do.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class _Progress:
    """Byte-count progress on stderr: tqdm when installed, else a one-line counter.

    Off when stderr is not a terminal (logs, CI) or with --quiet.
    """

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.total, self.desc, self.done = total, desc, 0
        self._bar: Any = None
        self._last = 0.0
        if self.enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True,
                                 unit_divisor=1024, file=sys.stderr, leave=False)
            except ImportError:
                pass

    def __call__(self, n: int) -> None:
        if not self.enabled:
            return
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last > 0.2 or self.done >= self.total:
            self._last = now
            pct = 100 * self.done / self.total if self.total else 100
            sys.stderr.write(f"\r{self.desc}: {self.done / 2**20:.0f} / "
                             f"{self.total / 2**20:.0f} MiB ({pct:.0f}%)")
            sys.stderr.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def _progress(args: argparse.Namespace, total: int, desc: str) -> _Progress:
    return _Progress(total, desc, not args.quiet)


# ---------------------------------------------------------------- commands


def cmd_inspect(args: argparse.Namespace) -> int:
    from .tools.inspect import format_inspect, inspect_checkpoint

    info = inspect_checkpoint(args.path)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        print(format_inspect(info, max_keys=args.max_keys))
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from .tools.verify import verify

    report = verify(args.path, deep=args.deep, threads=args.threads, raise_on_error=False)
    if args.json:
        print(json.dumps({"path": report.path, "ok": report.ok, "files": report.files,
                          "blocks": report.blocks, "bytes_checked": report.bytes_checked,
                          "deep": report.deep,
                          "problems": [vars(p) for p in report.problems]}, indent=2))
    else:
        print(report)
        if not report.ok:
            print("Load an earlier checkpoint; this one cannot be trusted.")
    return EXIT_OK if report.ok else EXIT_FAIL


def cmd_audit(args: argparse.Namespace) -> int:
    from .tools.audit import audit, audit_dict

    rep = audit(args.path, prefix=args.prefix)
    print(json.dumps(audit_dict(rep), indent=2) if args.json else rep)
    return EXIT_OK if rep.ok else EXIT_FAIL


def cmd_diff(args: argparse.Namespace) -> int:
    from .tools.diff import check_model, diff_checkpoints, is_model_target

    if is_model_target(args.b):
        rep: Any = check_model(args.a, args.b, prefix=args.prefix, trust_pickle=args.trust_pickle)
        print(rep)
        return EXIT_OK if rep.ok else EXIT_FAIL
    from .tools.sources import open_source

    with open_source(args.a, trust_pickle=args.trust_pickle) as s:
        total = sum(e.nbytes for e in s.entries.values())
    bar = _progress(args, total, "diff")
    try:
        rep = diff_checkpoints(args.a, args.b, values=not args.keys_only, on_progress=bar,
                               trust_pickle=args.trust_pickle)
    finally:
        bar.close()
    print(rep)
    return EXIT_OK if rep.same else EXIT_FAIL


def cmd_reshard(args: argparse.Namespace) -> int:
    from .tools.reshard import reshard, total_bytes
    from .tools.sources import ShardSource

    with ShardSource(args.src) as s:
        total = total_bytes(s)
    bar = _progress(args, total, "reshard")
    t0 = time.perf_counter()
    try:
        m = reshard(args.src, args.dst, args.world_size, compression=args.compression,
                    min_split_bytes=args.min_split_bytes, overwrite=args.overwrite,
                    on_progress=bar)
    finally:
        bar.close()
    on_disk = sum(f.size for f in m.files.values())
    if not args.quiet:
        print(f"{args.dst}: {len(m.tensors)} tensors, {len(m.objects)} objects in "
              f"{len(m.files)} files for world size {args.world_size}, "
              f"{on_disk / 2**20:.1f} MiB on disk, {time.perf_counter() - t0:.1f}s")
    return EXIT_OK


def cmd_convert(args: argparse.Namespace) -> int:
    from .tools.convert import convert
    from .tools.sources import open_source

    with open_source(args.src, args.from_format, trust_pickle=args.trust_pickle) as s:
        total = sum(e.nbytes for e in s.entries.values())
    bar = _progress(args, total, f"convert to {args.to}")
    t0 = time.perf_counter()
    try:
        r = convert(args.src, args.dst, args.to, source_format=args.from_format,
                    strip_prefix=args.strip_prefix or (), rename=args.rename or (),
                    world_size=args.world_size, compression=args.compression,
                    overwrite=args.overwrite, on_progress=bar, trust_pickle=args.trust_pickle)
    finally:
        bar.close()
    if not args.quiet:
        print(f"{args.src} ({r['source_format']}) -> {args.dst} ({args.to}): {r['tensors']} "
              f"tensors, {r['objects']} objects, {r['bytes'] / 2**20:.1f} MiB, "
              f"{time.perf_counter() - t0:.1f}s")
        for k in r["skipped"]:
            print(f"skipped object {k!r}: safetensors stores only tensors and JSON values",
                  file=sys.stderr)
    return EXIT_OK


def cmd_gc(args: argparse.Namespace) -> int:
    from .tools.gc import gc, parse_age

    rep = gc(args.root, keep_last=args.keep_last, older_than=parse_age(args.older_than),
             dry_run=args.dry_run)
    if not args.quiet:
        print(rep)
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    from .tools.bench import format_bench, run_bench

    r = run_bench(args.size_mb, directory=args.dir, threads=args.threads)
    print(json.dumps(r, indent=2) if args.json else format_bench(r))
    return EXIT_OK


# ---------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line + the usage hint, exit 2
        self.exit(EXIT_USAGE, f"shardckpt: error: {message} (see `{self.prog} --help`)\n")


def _sub(subs: Any, name: str, fn: Callable[[argparse.Namespace], int], help: str,
         example: str) -> argparse.ArgumentParser:
    p = subs.add_parser(name, help=help, description=help,
                        epilog=f"example:\n  {example}",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(fn=fn)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    return p


def _trust_pickle_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-pickle", action="store_true",
                   help="read a stock DCP .metadata with full unpickling (it can run code: "
                        "only for checkpoints from a trusted source)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="shardckpt", description="Inspect, check, reshard and convert "
                     "shardckpt checkpoints.",
                     epilog="run `shardckpt COMMAND --help` for each command's options")
    parser.add_argument("--version", action="version", version=f"shardckpt {__version__}")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subs.required = True

    p = _sub(subs, "inspect", cmd_inspect, "show what a checkpoint holds (manifest only)",
             "shardckpt inspect ckpts/step_00001000 --json")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--max-keys", type=int, default=None, help="list at most this many keys")

    p = _sub(subs, "verify", cmd_verify, "check every file and block checksum; exit 1 if damaged",
             "shardckpt verify ckpts/step_00001000 --deep")
    p.add_argument("path")
    p.add_argument("--deep", action="store_true", help="also decode every block")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")

    p = _sub(subs, "audit", cmd_audit, "is the checkpoint complete enough to resume training "
             "exactly? exit 1 if something is missing",
             "shardckpt audit ckpts/step_00001000 --prefix train.")
    p.add_argument("path")
    p.add_argument("--prefix", default=None, help="key prefix of the training state "
                   "(default: detected, e.g. 'train.')")
    p.add_argument("--json", action="store_true")

    p = _sub(subs, "diff", cmd_diff, "compare two checkpoints (keys, shapes, dtypes, values), or "
             "a checkpoint with a model given as module:function; exit 1 if they differ",
             "shardckpt diff ckpts/step_1000 ckpts/step_2000\n"
             "  shardckpt diff ckpts/step_1000 mypkg.models:build_model --prefix train.model.")
    p.add_argument("a")
    p.add_argument("b", help="a checkpoint (any format convert reads) or module:function "
                             "returning an nn.Module or a state dict")
    p.add_argument("--keys-only", action="store_true", help="skip comparing values")
    _trust_pickle_flag(p)
    p.add_argument("--prefix", default=None,
                   help="with module:function: prefix of the model keys in the checkpoint "
                        "(default: detected)")

    p = _sub(subs, "reshard", cmd_reshard, "rewrite a checkpoint as one file per rank for a new "
             "world size (balanced contiguous row ranges; values bitwise identical; streamed)",
             "shardckpt reshard ckpts/step_1000 ckpts/step_1000_ws8 --world-size 8")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--compression", choices=("zstd", "none"), default=None,
                   help="default: the source's")
    p.add_argument("--min-split-bytes", type=int, default=4096,
                   help="tensors smaller than this go whole to one file")
    p.add_argument("--overwrite", action="store_true")

    p = _sub(subs, "convert", cmd_convert, "convert between shardckpt, stock DCP, torch.save and "
             "safetensors. Streams tensor by tensor, except --to torch, which needs the whole "
             "state in RAM (torch.save writes one object)",
             "shardckpt convert ckpts/step_1000 model.safetensors --to safetensors "
             "--strip-prefix train.model.")
    p.add_argument("src", help="shardckpt dir, DCP dir (.metadata), torch.save file, "
                               ".safetensors file, or a *.safetensors.index.json")
    p.add_argument("dst")
    p.add_argument("--to", required=True, choices=("shardckpt", "dcp", "torch", "safetensors"))
    p.add_argument("--from", dest="from_format", default=None,
                   choices=("shardckpt", "dcp", "torch", "safetensors"),
                   help="source format (default: detected)")
    p.add_argument("--strip-prefix", action="append", metavar="PREFIX",
                   help="remove PREFIX from keys (repeatable), e.g. module. or _orig_mod.")
    p.add_argument("--rename", action="append", metavar="REGEX=REPL",
                   help="re.sub on every key (repeatable, applied in order)")
    p.add_argument("--world-size", type=int, default=1,
                   help="--to shardckpt: number of per-rank files")
    p.add_argument("--compression", choices=("zstd", "none"), default=None)
    p.add_argument("--overwrite", action="store_true")
    _trust_pickle_flag(p)

    p = _sub(subs, "gc", cmd_gc, "retention for a directory of step checkpoints, and removal of "
             "leftovers of interrupted saves; never removes what latest/best name",
             "shardckpt gc ckpts/ --keep-last 3 --older-than 1h --dry-run")
    p.add_argument("root")
    p.add_argument("--keep-last", type=int, default=None,
                   help="keep the newest N step checkpoints (default: delete none)")
    p.add_argument("--older-than", default="1h",
                   help="only remove leftovers older than this (30s, 15m, 1h, 2d)")
    p.add_argument("--dry-run", action="store_true", help="print what would be removed")

    p = _sub(subs, "bench", cmd_bench, "quick save/load/codec benchmark; shows the codec path "
             "(native or python)", "shardckpt bench --size-mb 128 --dir /mnt/nvme")
    p.add_argument("--size-mb", type=int, default=64)
    p.add_argument("--dir", default=None, help="where to write (default: the temp dir)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .errors import ShardckptError

    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ShardckptError as e:
        # Typed errors already say what is wrong and what to do; keep it to one line
        # per problem (verify lists several).
        print(f"shardckpt {args.command}: {e}", file=sys.stderr)
        return EXIT_FAIL
    except (ValueError, TypeError) as e:  # bad arguments (world size, --rename, target)
        print(f"shardckpt {args.command}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (FileExistsError, FileNotFoundError) as e:
        print(f"shardckpt {args.command}: {e}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        print(f"shardckpt {args.command}: interrupted; nothing partial was published",
              file=sys.stderr)
        return 130
    except BrokenPipeError:  # `shardckpt inspect X | head`
        os._exit(EXIT_OK)


if __name__ == "__main__":
    sys.exit(main())
