"""The `shardckpt` command line: thin argparse wrappers over library functions.

Exit status: 0 success / clean, 1 a failed check or a failed operation,
2 bad usage. Errors are one line on stderr (`shardckpt CMD: message`), never a
traceback. Each command computes its whole result first and prints it last, so
a closed stdout (`shardckpt diff A B | head -2`) does not change the status.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .commands import (
    EXIT_FAIL,
    EXIT_OK,
    EXIT_USAGE,
    Result,
    UsageError,
    cmd_audit,
    cmd_bench,
    cmd_convert,
    cmd_diff,
    cmd_gc,
    cmd_inspect,
    cmd_ls,
    cmd_materialize,
    cmd_migrate,
    cmd_reshard,
    cmd_verify,
    convert_kwargs,
)

__all__ = ["EXIT_FAIL", "EXIT_OK", "EXIT_USAGE", "UsageError", "build_parser", "convert_kwargs",
           "main"]
FORMATS = ("shardckpt", "dcp", "torch", "safetensors")


# ---------------------------------------------------------------- argument types


def _int_at_least(lo: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, got {v}")
        return v
    return parse


_positive = _int_at_least(1)
_non_negative = _int_at_least(0)


def _checked(fn: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return fn(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = fn.__name__
    return parse


def _age(text: str) -> float:
    from ..tools.gc import parse_age

    return parse_age(text)


def _size(text: str) -> int:
    from ..tools.report import parse_size

    return parse_size(text)


def _rename(text: str) -> str:
    from ..format.keys import key_mapper

    key_mapper(rename=[text])  # a bad regex or a missing '=' is a usage error
    return text


# ---------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line + the usage hint, exit 2
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _sub(subs: Any, name: str, fn: Callable[[argparse.Namespace], Result], help: str,
         example: str, *, progress: bool = True) -> argparse.ArgumentParser:
    p = subs.add_parser(name, help=help, description=help,
                        epilog=f"example:\n  {example}",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(fn=fn)
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bar and no summary" if progress else "no summary")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object on stdout (schema: docs/CLI.md)")
    return p


def _trust_pickle_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-pickle", action="store_true",
                   help="read a stock DCP .metadata with full unpickling (it can run code: "
                        "only for checkpoints from a trusted source)")


def _key_map_flags(p: argparse.ArgumentParser, side: str) -> None:
    p.add_argument("--strip-prefix", action="append", metavar="PREFIX",
                   help=f"remove PREFIX from {side} keys wherever it starts a key component "
                        f"(repeatable), e.g. module. or _orig_mod.")
    p.add_argument("--rename", action="append", metavar="REGEX=REPL", type=_checked(_rename),
                   help=f"re.sub on {side} keys, after --strip-prefix (repeatable, in order)")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = _Parser(prog="shardckpt", description="Inspect, check, reshard and convert "
                     "shardckpt checkpoints.",
                     epilog="run `shardckpt COMMAND --help` for each command's options")
    parser.add_argument("--version", action="version", version=f"shardckpt {__version__}")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser,
                                 help="the command to run (`shardckpt COMMAND --help`)")
    subs.required = True

    p = _sub(subs, "ls", cmd_ls, "list the step checkpoints of a CheckpointManager root (size, "
             "time, pointers, metrics, validity) and leftovers of interrupted saves",
             "shardckpt ls ckpts/", progress=False)
    p.add_argument("root", help="the manager's root directory (holding step_* checkpoints)")

    p = _sub(subs, "inspect", cmd_inspect, "show what a checkpoint holds (shardckpt: manifest "
             "only; also stock DCP, torch.save and safetensors)",
             "shardckpt inspect ckpts/step_00001000 --max-keys 20", progress=False)
    p.add_argument("path", help="a checkpoint: shardckpt or DCP directory, torch.save file, "
                                ".safetensors file or index")
    p.add_argument("--max-keys", type=_non_negative, default=None, metavar="N",
                   help="list at most N keys (default: all)")
    p.add_argument("--from", dest="from_format", default=None, choices=FORMATS,
                   help="source format (default: detected)")
    _trust_pickle_flag(p)

    p = _sub(subs, "verify", cmd_verify, "check every file and block checksum; exit 1 if damaged",
             "shardckpt verify ckpts/step_00001000 --deep")
    p.add_argument("path", help="a shardckpt checkpoint directory")
    p.add_argument("--deep", action="store_true", help="also decode every block")
    p.add_argument("--threads", type=_positive, default=None, metavar="N",
                   help="codec threads (default: the codec's default)")

    p = _sub(subs, "audit", cmd_audit, "is the checkpoint complete enough to resume training "
             "exactly? exit 1 if something is missing",
             "shardckpt audit ckpts/step_00001000 --prefix train.", progress=False)
    p.add_argument("path", help="a shardckpt checkpoint directory")
    p.add_argument("--prefix", default=None, help="key prefix of the training state "
                   "(default: detected, e.g. 'train.')")

    p = _sub(subs, "diff", cmd_diff, "compare two checkpoints (keys, shapes, dtypes, values), or "
             "a checkpoint with a model given as module:function; exit 1 if they differ",
             "shardckpt diff ckpts/step_1000 ckpts/step_2000\n"
             "  shardckpt diff ddp_ckpt fsdp_ckpt --strip-prefix module.\n"
             "  shardckpt diff ckpts/step_1000 mypkg.models:build_model --prefix train.model.")
    p.add_argument("a", help="side A: a checkpoint (any format convert reads)")
    p.add_argument("b", help="side B: a checkpoint (any format convert reads) or module:function "
                             "returning an nn.Module or a state dict")
    p.add_argument("--keys-only", action="store_true", help="skip comparing values")
    _key_map_flags(p, "side A's")
    _trust_pickle_flag(p)
    p.add_argument("--prefix", default=None,
                   help="with module:function: prefix of the model keys in the checkpoint "
                        "(default: detected)")

    p = _sub(subs, "reshard", cmd_reshard, "rewrite a checkpoint as one file per rank for a new "
             "world size (balanced contiguous row ranges; values bitwise identical; streamed)",
             "shardckpt reshard ckpts/step_1000 ckpts/step_1000_ws8 --world-size 8")
    p.add_argument("src", help="the shardckpt checkpoint to read")
    p.add_argument("dst", help="where to write the resharded checkpoint")
    p.add_argument("--world-size", type=_positive, required=True, metavar="M",
                   help="number of per-rank files to write")
    p.add_argument("--compression", choices=("zstd", "none"), default=None,
                   help="codec of the new checkpoint (default: the source's)")
    p.add_argument("--min-split-bytes", type=_non_negative, default=4096, metavar="N",
                   help="tensors smaller than N bytes go whole to one file (default 4096)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST checkpoint")

    p = _sub(subs, "convert", cmd_convert, "convert between shardckpt, stock DCP, torch.save and "
             "safetensors. Streams tensor by tensor, except --to torch, which needs the whole "
             "state in RAM (torch.save writes one object)",
             "shardckpt convert ckpts/step_1000 model.safetensors --to safetensors "
             "--strip-prefix train.model.")
    p.add_argument("src", help="shardckpt dir, DCP dir (.metadata), torch.save file, "
                               ".safetensors file, or a *.safetensors.index.json")
    p.add_argument("dst", help="the file or directory to write")
    p.add_argument("--to", required=True, choices=FORMATS, help="target format")
    p.add_argument("--from", dest="from_format", default=None, choices=FORMATS,
                   help="source format (default: detected)")
    _key_map_flags(p, "the source's")
    p.add_argument("--world-size", type=_positive, default=1, metavar="N",
                   help="--to shardckpt: number of per-rank files (default 1)")
    p.add_argument("--compression", choices=("zstd", "none"), default=None,
                   help="--to shardckpt: codec (default: the source's, else zstd)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    _trust_pickle_flag(p)
    p.add_argument("--model-only", action="store_true",
                   help="only the model's weights")
    p.add_argument("--include", action="append", metavar="GLOB",
                   help="only keys matching GLOB (repeatable)")
    p.add_argument("--exclude", action="append", metavar="GLOB",
                   help="leave out keys matching GLOB (repeatable)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="cast floating-point tensors")
    p.add_argument("--max-shard-size", type=_checked(_size), default=None, metavar="SIZE",
                   help="split output files at SIZE, e.g. 5GB, 500MB, 2GiB")
    p.add_argument("--train-state", action="store_true",
                   help="write the TrainState layout")

    p = _sub(subs, "migrate", cmd_migrate, "rewrite an older checkpoint's manifest in the current "
             "format version, in place and atomically (data files untouched)",
             "shardckpt migrate ckpts/step_00001000 --dry-run", progress=False)
    p.add_argument("path", help="a shardckpt checkpoint directory")
    p.add_argument("--dry-run", action="store_true", help="only say what would change")

    p = _sub(subs, "materialize", cmd_materialize, "rewrite an incremental checkpoint as a "
             "standalone one (its referenced blocks copied in), in place or at --out",
             "shardckpt materialize ckpts/step_00001000 --out exported/step_00001000",
             progress=False)
    p.add_argument("path", help="a shardckpt checkpoint directory")
    p.add_argument("--out", default=None, help="write the standalone copy here (default: "
                   "in place, refused while other checkpoints reference this one)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    p = _sub(subs, "gc", cmd_gc, "retention for a directory of step checkpoints, and removal of "
             "leftovers of interrupted saves; never removes what latest/best name",
             "shardckpt gc ckpts/ --keep-last 3 --older-than 1h --dry-run", progress=False)
    p.add_argument("root", help="the manager's root directory (holding step_* checkpoints)")
    p.add_argument("--keep-last", type=_positive, default=None, metavar="N",
                   help="keep the newest N step checkpoints (default: delete none)")
    p.add_argument("--older-than", type=_checked(_age), default=3600.0, metavar="AGE",
                   help="only remove leftovers older than AGE: 30s, 15m, 1h, 2d (default 1h)")
    p.add_argument("--dry-run", action="store_true", help="print what would be removed")

    p = _sub(subs, "bench", cmd_bench, "quick save/load/codec benchmark; shows the codec path "
             "(native or python)", "shardckpt bench --size-mb 128 --dir /mnt/nvme")
    p.add_argument("--size-mb", type=_positive, default=64, metavar="MB",
                   help="MiB of data to save and load (default 64)")
    p.add_argument("--dir", default=None, help="an existing directory to write into "
                                               "(default: the temp dir)")
    p.add_argument("--threads", type=_positive, default=None, metavar="N",
                   help="codec threads (default: the codec's default)")
    return parser


def _silence_stdout() -> None:
    """stdout is a closed pipe: send what is left (and the flush at exit) to /dev/null."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
    except (OSError, ValueError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    from ..tools.report import error_message

    args = build_parser().parse_args(argv)
    cmd = f"shardckpt {args.command}"
    try:
        status, text = args.fn(args)
    except UsageError as e:
        print(f"{cmd}: error: {e} (see `{cmd} --help`)", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{cmd}: interrupted; nothing partial was published", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place every error becomes one line
        try:
            print(f"{cmd}: {error_message(e)}", file=sys.stderr)
        except BrokenPipeError:
            pass
        return EXIT_FAIL
    try:
        if text:
            sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:  # `shardckpt diff A B | head -2`: the status is already known
        _silence_stdout()
    return status
