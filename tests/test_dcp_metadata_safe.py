"""read_dcp_metadata: stock DCP `.metadata` read without running code from it.

Real checkpoints written by torch's own DCP (one process, and a 2-rank gloo world with
FSDP2), real planted files; no mocks.
"""

from __future__ import annotations

import builtins
import os
import pathlib
import pickle
import random
import socket
import struct
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata

from shardckpt.dcp.allowlist import ALLOWED_GLOBALS
from shardckpt.dcp.stock import read_dcp_metadata
from shardckpt.errors import CorruptCheckpointError, UnsafeObjectError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning",
                                        "ignore::DeprecationWarning")

_MD = "torch.distributed.checkpoint.metadata"


def _save(d: pathlib.Path, sd: dict) -> pathlib.Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(sd, storage_writer=FileSystemWriter(str(d)))
    return d


def _assert_same_as_torch(d: pathlib.Path) -> Metadata:
    ours = read_dcp_metadata(d)
    theirs = FileSystemReader(str(d)).read_metadata()
    assert isinstance(ours, Metadata)
    assert ours.state_dict_metadata == theirs.state_dict_metadata
    assert ours.storage_data == theirs.storage_data
    assert ours.planner_data == theirs.planner_data
    assert ours.version == theirs.version
    for f in ("checkpoint_id", "save_id", "modules"):
        assert getattr(ours.storage_meta, f) == getattr(theirs.storage_meta, f)
    assert ours.storage_meta.load_id  # filled in, as FileSystemReader does
    return ours


# -- stock checkpoints ----------------------------------------------------------------------

_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8,
           torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128,
           torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16, torch.uint32, torch.uint64]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("stock")
    out = {}
    out["dtypes"] = _save(root / "dtypes", {
        f"t_{str(dt).split('.')[-1]}": torch.zeros(3, 2, dtype=dt) for dt in _DTYPES}
        | {"scalar": torch.tensor(2.5), "empty": torch.empty(0, 4),
           "channels_last": torch.zeros(1, 3, 2, 2).to(memory_format=torch.channels_last),
           "param": torch.nn.Parameter(torch.ones(3))})
    out["nested"] = _save(root / "nested", {
        "model": {"enc": {"w": torch.randn(4, 3), "b": torch.randn(4)}, "head": torch.ones(2)},
        "step": 7, "name": "run-1", "lr": 1e-3, "flags": [1, "two", 3.0, None],
        "pair": (1, 2), "cfg": {"layers": 2, "acts": ["gelu", "relu"]},
        "list_of_tensors": [torch.ones(2), torch.zeros(1)], "none": None})
    m = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 2))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    m(torch.randn(3, 4)).sum().backward()
    opt.step()
    from torch.distributed.checkpoint.state_dict import get_state_dict

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        msd, osd = get_state_dict(m, opt)
    out["module_optim"] = _save(root / "module_optim", {"model": msd, "optim": osd, "epoch": 2})
    return out


@pytest.mark.parametrize("kind", ["dtypes", "nested", "module_optim"])
def test_stock_checkpoint_reads_like_torch(ckpts, kind):
    md = _assert_same_as_torch(ckpts[kind])
    assert md.state_dict_metadata  # not vacuous


def test_stock_checkpoint_dtypes_and_objects(ckpts):
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    md = read_dcp_metadata(str(ckpts["dtypes"]))
    got = {k: m.properties.dtype for k, m in md.state_dict_metadata.items() if k.startswith("t_")}
    assert sorted(got.values(), key=str) == sorted(_DTYPES, key=str)
    assert md.state_dict_metadata["param"].properties.requires_grad is True
    md = read_dcp_metadata(ckpts["nested"])
    assert isinstance(md.state_dict_metadata["step"], BytesStorageMetadata)
    assert isinstance(md.state_dict_metadata["name"], BytesStorageMetadata)
    assert md.planner_data["model.enc.w"] == ("model", "enc", "w")


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_other_pickle_protocols_of_the_same_metadata(ckpts, tmp_path, protocol):
    theirs = FileSystemReader(str(ckpts["module_optim"])).read_metadata()
    (tmp_path / ".metadata").write_bytes(pickle.dumps(theirs, protocol=protocol))
    ours = read_dcp_metadata(tmp_path)
    assert ours.state_dict_metadata == theirs.state_dict_metadata
    assert ours.storage_data == theirs.storage_data
    assert ours.planner_data == theirs.planner_data


def test_allow_list_is_small_and_has_no_callables_that_run_code():
    allowed = set(ALLOWED_GLOBALS)
    for bad in ("builtins.eval", "builtins.exec", "builtins.getattr", "os.system",
                "posix.system", "torch.load", "torch._utils._rebuild_tensor_v2",
                "torch.storage._load_from_bytes", "copyreg._reconstructor",
                "builtins.__import__", "pathlib.Path"):
        assert bad not in allowed
    non_dtype = [g for g in allowed if not (g.startswith("torch.") and g.count(".") == 1
                                            and isinstance(getattr(torch, g[6:]), torch.dtype))]
    assert "torch.Size" in non_dtype and f"{_MD}.Metadata" in non_dtype
    assert len(non_dtype) <= 25, non_dtype


# -- FSDP2, 2-rank gloo world -----------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fsdp2_worker(rank: int, world: int, port: int, d: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.checkpoint.state_dict import get_state_dict
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor

        torch.manual_seed(0)
        mesh = init_device_mesh("cpu", (world,))
        m = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
        for layer in m:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(m, mesh=mesh)
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        m(torch.randn(4, 8)).sum().backward()
        opt.step()
        msd, osd = get_state_dict(m, opt)
        assert all(isinstance(v, DTensor) for v in msd.values())
        dcp.save({"model": msd, "optim": osd, "step": 1}, checkpoint_id=d)
        # Both ranks past every collective before either tears gloo down: a rank that
        # destroys its group while the peer's gloo threads still talk to it can abort
        # in gloo's C++ teardown ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_fsdp2_sharded_dtensor_checkpoint_reads_like_torch(tmp_path):
    import torch.multiprocessing as mp

    d = tmp_path / "fsdp2"
    d.mkdir()
    mp.spawn(_fsdp2_worker, args=(2, _free_port(), str(d)), nprocs=2, join=True)
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(os.listdir(d))
    md = _assert_same_as_torch(d)
    w = md.state_dict_metadata["model.0.weight"]
    assert tuple(w.size) == (6, 8) and len(w.chunks) == 2  # one shard per rank
    assert {c.offsets[0] for c in w.chunks} == {0, 3}


# -- planted payloads -----------------------------------------------------------------------

class _System:
    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _Exec:
    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return (builtins.exec, (self.code,))


def _plant(d: pathlib.Path, data: bytes) -> pathlib.Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / ".metadata").write_bytes(data)
    return d


def _refused(d: pathlib.Path, *names: str) -> UnsafeObjectError:
    with pytest.raises(UnsafeObjectError) as ei:
        read_dcp_metadata(d)
    msg = str(ei.value)
    assert "\n" not in msg
    assert str(d / ".metadata") in msg
    assert "--trust-pickle" in msg and "trust_pickle=True" in msg
    assert any(n in msg for n in names), msg
    return ei.value


def test_repro_os_system_payload_refused_and_runs_only_when_trusted(ckpts, tmp_path):
    # The reported repro: a stock DCP dir whose .metadata is replaced by a payload.
    import shutil

    d = tmp_path / "ckpt"
    shutil.copytree(ckpts["nested"], d)
    pwned = tmp_path / "PWNED"
    (d / ".metadata").write_bytes(pickle.dumps(_System(f"touch {pwned}")))
    err = _refused(d, "posix.system", "os.system")
    assert err.global_name in ("posix.system", "os.system")
    assert not pwned.exists()
    # Positive control: the same file does run code through torch's reader.
    with pytest.raises(CorruptCheckpointError):  # it returns 0, not a Metadata
        read_dcp_metadata(d, trust_pickle=True)
    assert pwned.exists()


def test_exec_payload_refused(tmp_path):
    pwned = tmp_path / "PWNED"
    d = _plant(tmp_path / "c", pickle.dumps(_Exec(f"open({str(pwned)!r}, 'w').close()")))
    _refused(d, "builtins.exec")
    assert not pwned.exists()
    with pytest.raises(CorruptCheckpointError):
        read_dcp_metadata(d, trust_pickle=True)
    assert pwned.exists()


def _valid_md(ckpts) -> Metadata:
    return FileSystemReader(str(ckpts["nested"])).read_metadata()


@pytest.mark.parametrize("where", ["planner_data", "storage_meta", "chunk", "storage_data"])
def test_payload_nested_in_valid_metadata_refused(ckpts, tmp_path, where):
    pwned = tmp_path / "PWNED"
    md = _valid_md(ckpts)
    evil = _System(f"touch {pwned}")
    if where == "planner_data":
        md.planner_data["model.enc.w"] = evil
    elif where == "storage_meta":
        md.storage_meta.modules = ["a", evil]
    elif where == "chunk":
        md.state_dict_metadata["model.enc.w"].chunks[0].sizes = evil
    else:
        k = next(iter(md.storage_data))
        md.storage_data[k].relative_path = evil
    d = _plant(tmp_path / "c", pickle.dumps(md))
    _refused(d, "posix.system", "os.system")
    assert not pwned.exists()
    # torch's reader runs it (the test would notice a reader that did).
    read_dcp_metadata(d, trust_pickle=True)
    assert pwned.exists()


def test_tensor_in_planner_data_refused(ckpts, tmp_path):
    # A pickled tensor needs torch._utils._rebuild_tensor_v2 / torch.storage._load_from_bytes
    # (which calls torch.load): not DCP metadata.
    md = _valid_md(ckpts)
    md.planner_data["x"] = torch.ones(2)
    d = _plant(tmp_path / "c", pickle.dumps(md))
    _refused(d, "torch._utils._rebuild_tensor", "torch.storage._load_from_bytes")


def _p0_call(module: str, name: str, arg: str) -> bytes:
    """Protocol 0: GLOBAL module name; MARK; UNICODE arg; TUPLE; REDUCE; STOP."""
    return (b"c" + module.encode() + b"\n" + name.encode() + b"\n(V" + arg.encode()
            + b"\ntR.")


def _u(s: str) -> bytes:
    b = s.encode()
    return b"\x8c" + bytes([len(b)]) + b


def _sg(module: str, name: str) -> bytes:
    return _u(module) + _u(name) + b"\x93"


def _p4_call(module: str, name: str, arg: str) -> bytes:
    """Protocol 4: STACK_GLOBAL; SHORT_BINUNICODE arg; TUPLE1; REDUCE; STOP."""
    return b"\x80\x04" + _sg(module, name) + _u(arg) + b"\x85R."


_CODE_GLOBALS = [
    ("os", "system", "touch {p}"),
    ("posix", "system", "touch {p}"),
    ("builtins", "exec", "open({p!r}, 'w').close()"),
    ("builtins", "eval", "open({p!r}, 'w').close()"),
    ("builtins", "__import__", "os"),
    ("builtins", "getattr", "x"),
    ("subprocess", "getoutput", "touch {p}"),
    ("torch", "load", "{p}.pt"),
    ("torch.serialization", "load", "{p}.pt"),
    ("torch._utils", "_rebuild_tensor", "x"),
    ("torch._utils", "_rebuild_tensor_v2", "x"),
    ("torch._utils", "_rebuild_parameter", "x"),
    ("torch.storage", "_load_from_bytes", "x"),
    ("pathlib", "Path.write_text", "x"),  # dotted names are never resolved
    (_MD, "Metadata.__init__.__globals__", "x"),
    ("torch", "Size.__new__", "x"),
]


@pytest.mark.parametrize("protocol", [0, 4])
@pytest.mark.parametrize("module,name,arg", _CODE_GLOBALS)
def test_code_running_globals_refused(tmp_path, protocol, module, name, arg):
    pwned = tmp_path / "PWNED"
    arg = arg.format(p=str(pwned))
    build = _p0_call if protocol == 0 else _p4_call
    d = _plant(tmp_path / "c", build(module, name, arg))
    err = _refused(d, f"{module}.{name}")
    assert err.global_name == f"{module}.{name}"
    assert not pwned.exists()


def test_inst_and_ext_opcodes_refused(tmp_path):
    pwned = tmp_path / "PWNED"
    # INST: protocol-0 "instantiate module.name(*args)"
    d = _plant(tmp_path / "inst", b"(V" + f"touch {pwned}".encode() + b"\nios\nsystem\n.")
    _refused(d, "os.system")
    d = _plant(tmp_path / "ext", b"\x80\x02\x82\x01.")  # EXT1 code 1
    _refused(d, "copyreg")
    assert not pwned.exists()


# Allowed globals, used in ways DCP never does.

def test_enum_functional_api_call_refused(tmp_path):
    data = b"\x80\x04" + _sg(_MD, "_MEM_FORMAT_ENCODING") + _u("X") + _u("A B") + b"\x86R."
    _refused(_plant(tmp_path / "c", data), f"{_MD}._MEM_FORMAT_ENCODING")


def test_size_with_non_int_args_refused(tmp_path):
    data = b"\x80\x04" + _sg("torch", "Size") + b"]" + _u("a") + b"a\x85R."
    _refused(_plant(tmp_path / "c", data), "torch.Size")


def test_unknown_layout_refused(tmp_path):
    data = b"\x80\x04" + _sg("torch.serialization", "_get_layout") + _u("torch.nope") + b"\x85R."
    _refused(_plant(tmp_path / "c", data), "torch.serialization._get_layout")


def test_build_on_a_class_refused_and_class_untouched(tmp_path):
    # BUILD with slot state on the class itself would setattr(PosixPath, '__fspath__', ...).
    before = pathlib.PosixPath.__dict__.get("__fspath__")
    data = (b"\x80\x04" + _sg("pathlib", "PosixPath") + b"N}" + _u("__fspath__")
            + _sg("torch", "Size") + b"s\x86b.")
    _refused(_plant(tmp_path / "c", data), "pathlib.PosixPath")
    assert pathlib.PosixPath.__dict__.get("__fspath__") is before
    data = (b"\x80\x04" + _sg(_MD, "Metadata") + b"N}" + _u("__eq__")
            + _sg("torch", "Size") + b"s\x86b.")
    _refused(_plant(tmp_path / "c2", data), f"{_MD}.Metadata")
    assert "__eq__" in Metadata.__dict__ and Metadata.__dict__["__eq__"] is not torch.Size


def test_dunder_state_on_instance_refused(tmp_path):
    data = (b"\x80\x04" + _sg(_MD, "StorageMeta") + b")\x81}" + _u("__class__")
            + _sg(_MD, "Metadata") + b"sb.")
    _refused(_plant(tmp_path / "c", data), f"{_MD}.StorageMeta")


def test_reduce_of_dataclass_and_newobj_of_callable_refused(tmp_path):
    _refused(_plant(tmp_path / "a", b"\x80\x04" + _sg(_MD, "Metadata") + b"}\x85R."),
             f"{_MD}.Metadata")
    _refused(_plant(tmp_path / "b", b"\x80\x04" + _sg("torch", "Size") + b")\x81."),
             "torch.Size")
    _refused(_plant(tmp_path / "c", b"\x80\x04" + _sg(_MD, "Metadata") + b"K\x01\x85\x81."),
             f"{_MD}.Metadata")


def test_protocol_1_reconstructor_refused(ckpts, tmp_path):
    d = _plant(tmp_path / "c", pickle.dumps(_valid_md(ckpts), protocol=1))
    _refused(d, "copyreg._reconstructor", "copy_reg._reconstructor")


def test_protocol_2_python2_names_of_allowed_globals(ckpts, tmp_path):
    # Protocol < 3 names builtins as __builtin__ (set, frozenset): mapped back like pickle does.
    theirs = _valid_md(ckpts)
    theirs.planner_data["extra"] = ({1, 2}, frozenset({3}))
    data = pickle.dumps(theirs, protocol=2)
    assert b"__builtin__\nset" in data
    ours = read_dcp_metadata(_plant(tmp_path / "c", data))
    assert ours.planner_data == theirs.planner_data
    assert ours.state_dict_metadata == theirs.state_dict_metadata


@pytest.mark.parametrize("rel", ["../../etc/passwd", "/etc/passwd", "sub/../../x", "..\\x",
                                 "C:\\x"])
def test_storage_entry_outside_the_checkpoint_refused(ckpts, tmp_path, rel):
    md = _valid_md(ckpts)
    k = next(iter(md.storage_data))
    md.storage_data[k] = _StorageInfo(rel, 0, 10)
    _refused(_plant(tmp_path / "c", pickle.dumps(md)), "_StorageInfo")


# -- damaged files ----------------------------------------------------------------------------

def _corrupt(d: pathlib.Path, *, trust: bool = False) -> CorruptCheckpointError:
    with pytest.raises(CorruptCheckpointError) as ei:
        read_dcp_metadata(d, trust_pickle=trust)
    assert str(d / ".metadata") in str(ei.value)
    assert ei.value.path == str(d / ".metadata")
    return ei.value


@pytest.mark.parametrize("trust", [False, True])
def test_missing_empty_garbage_metadata(tmp_path, trust):
    d = tmp_path / "missing"
    d.mkdir()
    (d / "__0_0.distcp").write_bytes(b"x")
    _corrupt(d, trust=trust)
    _corrupt(_plant(tmp_path / "empty", b""), trust=trust)
    _corrupt(_plant(tmp_path / "text", b"hello, this is not a pickle\n"), trust=trust)
    _corrupt(_plant(tmp_path / "root_dict", pickle.dumps({"a": 1})), trust=trust)
    _corrupt(_plant(tmp_path / "stop_only", b"."), trust=trust)


def test_random_bytes(tmp_path):
    for seed in range(20):
        data = random.Random(seed).randbytes(4096)
        d = _plant(tmp_path / f"r{seed}", data)
        try:
            read_dcp_metadata(d)
        except CorruptCheckpointError:
            continue
        except UnsafeObjectError:  # random bytes may spell a GLOBAL: refused, also fine
            continue
        pytest.fail(f"seed {seed}: random bytes read as metadata")
    _corrupt(_plant(tmp_path / "r0", random.Random(0).randbytes(4096)))


def test_every_truncation_is_corrupt(ckpts, tmp_path):
    data = (ckpts["nested"] / ".metadata").read_bytes()
    d = tmp_path / "c"
    step = max(1, len(data) // 500)
    for cut in [*range(0, 64), *range(64, len(data) - 1, step), len(data) - 1]:
        _plant(d, data[:cut])
        _corrupt(d)
    for cut in (1, len(data) // 3, len(data) // 2, len(data) - 2):
        _plant(d, data[:cut])
        _corrupt(d, trust=True)


def test_bit_flips_never_escape_as_other_errors(ckpts, tmp_path):
    data = (ckpts["nested"] / ".metadata").read_bytes()
    rnd = random.Random(1234)
    d = tmp_path / "c"
    kinds = set()
    for _ in range(400):
        b = bytearray(data)
        for _ in range(rnd.randint(1, 3)):
            b[rnd.randrange(len(b))] = rnd.randrange(256)
        _plant(d, bytes(b))
        try:
            read_dcp_metadata(d)
            kinds.add("ok")
        except (CorruptCheckpointError, UnsafeObjectError) as e:
            kinds.add(type(e).__name__)
    assert "CorruptCheckpointError" in kinds


def _with_marker_replaced(md: Metadata, ops: bytes) -> bytes:
    """Pickle md (protocol 3: no frames), planner_data['model.enc.w'] replaced by raw ops."""
    marker = "\u2603MARKER\u2603"
    md.planner_data["model.enc.w"] = marker
    data = pickle.dumps(md, protocol=3)
    enc = marker.encode()
    op = b"X" + struct.pack("<I", len(enc)) + enc
    assert data.count(op) == 1
    return data.replace(op, ops)


def test_deep_nesting_is_corrupt_not_recursion_error(ckpts, tmp_path):
    n = 50_000
    deep = b"]" * n + b"a" * (n - 1)  # [[[[...]]]]
    d = _plant(tmp_path / "deep", _with_marker_replaced(_valid_md(ckpts), deep))
    assert "nests more than 100 levels" in str(_corrupt(d))
    d = _plant(tmp_path / "deep_root", b"\x80\x04" + deep + b".")
    _corrupt(d)
    d = _plant(tmp_path / "deep_tuple", b"\x80\x04" + b"(" * n + b"t" * n + b".")
    _corrupt(d)


def test_cycle_is_corrupt(ckpts, tmp_path):
    idx = struct.pack("<I", 1_000_000)  # a memo slot the pickler never uses
    cyc = b"]r" + idx + b"j" + idx + b"a"  # L = []; memo[idx] = L; L.append(L)
    d = _plant(tmp_path / "cyc", _with_marker_replaced(_valid_md(ckpts), cyc))
    assert "cycle" in str(_corrupt(d))


def _deep_tuple(n: int) -> bytes:
    return b")" + b"\x85" * n  # ((((),),),)


def _dag_tuple(n: int) -> bytes:
    return b")" + b"2\x86" * n  # t = (t, t), n times: 2**n leaves, n+1 objects


_KEY_OPS = {  # (ops before the key, ops after it); each hashes the key
    "SETITEM": (b"}", b"K\x01s"),
    "SETITEMS": (b"}(", b"K\x01u"),
    "DICT": (b"(", b"K\x01d"),
    "ADDITEMS": (b"\x8f(", b"\x90"),
    "FROZENSET": (b"(", b"\x91"),
    "set()": (b"c__builtin__\nset\n", b"\x85\x85R"),  # set((key,))
}


@pytest.mark.parametrize("op", list(_KEY_OPS))
@pytest.mark.parametrize("shape", ["deep", "dag"])
def test_keys_too_deep_to_hash_are_corrupt(tmp_path, op, shape):
    # Deep: hashing recurses in C (1M deep segfaults; see the subprocess test below).
    # DAG: hashing (t, t) re-hashes t, 2**40 times here: a hang without the check.
    key = _deep_tuple(5_000) if shape == "deep" else _dag_tuple(40)
    pre, post = _KEY_OPS[op]
    proto = b"\x80\x02" if op == "set()" else b"\x80\x04"
    d = _plant(tmp_path / "c", proto + pre + key + post + b".")
    assert "key nests more than" in str(_corrupt(d))


_CRASH_SCRIPT = """
import sys
from shardckpt.errors import CorruptCheckpointError
from shardckpt.dcp.stock import read_dcp_metadata
try:
    read_dcp_metadata(sys.argv[1])
except CorruptCheckpointError as e:
    print("CORRUPT", e)
"""


def test_million_deep_key_does_not_crash_the_process(tmp_path):
    # Plain pickle.load of this file segfaults (C tuple hash recursion); run in a child so
    # that a regression fails this test instead of killing the test session.
    import subprocess
    import sys

    d = _plant(tmp_path / "c", b"\x80\x04}" + _deep_tuple(1_000_000) + b"K\x01s.")
    r = subprocess.run([sys.executable, "-c", _CRASH_SCRIPT, str(d)], capture_output=True,
                       text=True, timeout=300, cwd=str(pathlib.Path(__file__).parents[1]))
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert "CORRUPT" in r.stdout and "key nests more than" in r.stdout


def test_container_ops_only_onto_containers(tmp_path):
    data = b"\x80\x04" + _sg(_MD, "StorageMeta") + b")\x81" + _u("k") + b"K\x01s."
    _corrupt(_plant(tmp_path / "a", data))  # SETITEM onto a dataclass instance
    data = b"\x80\x04" + _sg("collections", "OrderedDict") + b")R" + _u("k") + b"K\x01s."
    with pytest.raises(CorruptCheckpointError, match="holds a OrderedDict"):
        read_dcp_metadata(_plant(tmp_path / "b", data))  # built fine; just not Metadata


def test_marker_helper_itself_reads_back(ckpts, tmp_path):
    # The marker splice keeps the pickle valid: a plain string spliced in reads fine.
    md = _valid_md(ckpts)
    d = _plant(tmp_path / "c", _with_marker_replaced(md, b"X\x02\x00\x00\x00ok"))
    assert read_dcp_metadata(d).planner_data["model.enc.w"] == "ok"


# -- SafeFileSystemReader: dcp.load without torch's own read_metadata ---------------------------

def test_safe_reader_loads_tensors_like_torch(ckpts):
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    from shardckpt.dcp.stock import SafeFileSystemReader

    d = ckpts["nested"]
    md = read_dcp_metadata(d)
    keys = [k for k, m in md.state_dict_metadata.items() if hasattr(m, "size")]

    def load(reader):
        st = {k: torch.empty(tuple(md.state_dict_metadata[k].size)) for k in keys}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load(st, storage_reader=reader, planner=DefaultLoadPlanner(allow_partial_load=True))
        return st

    ours = load(SafeFileSystemReader(d, metadata=md))
    theirs = load(FileSystemReader(str(d)))
    assert keys and all(torch.equal(ours[k], theirs[k]) for k in keys)
    assert load(SafeFileSystemReader(d))["model.enc.b"].shape == (4,)  # reads it itself


def test_safe_reader_never_unpickles_a_planted_metadata(ckpts, tmp_path):
    import shutil

    from shardckpt.dcp.stock import SafeFileSystemReader

    d = tmp_path / "ckpt"
    shutil.copytree(ckpts["nested"], d)
    pwned = tmp_path / "PWNED"
    (d / ".metadata").write_bytes(pickle.dumps(_System(f"touch {pwned}")))
    (d / "__0.metadata").write_bytes(pickle.dumps(_System(f"touch {pwned}")))  # rank fallback
    reader = SafeFileSystemReader(d)
    with pytest.raises(UnsafeObjectError):
        reader.read_metadata()
    with pytest.raises(UnsafeObjectError):
        reader.read_metadata(rank=0)
    # dcp.load swallows the first refusal, retries with rank=0, then raises a
    # CheckpointException (a BaseException, not an Exception) naming both refusals.
    from torch.distributed.checkpoint.api import CheckpointException

    with warnings.catch_warnings(), pytest.raises(CheckpointException, match="refused"):
        warnings.simplefilter("ignore")
        dcp.load({"step": 0}, storage_reader=reader)
    assert not pwned.exists()
