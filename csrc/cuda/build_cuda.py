"""Build of shardckpt._cuda with nvcc, shared by setup.py and tests/test_cuda_build.py.

setuptools knows no nvcc, and the module is two files, so the three commands
are run here directly rather than through a build system: the test compiles
exactly what `pip install` compiles.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sysconfig
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = ("copy_engine.cu", "module.cpp")
DEPENDS = ("copy_engine.h",)
# A100 and H100/H200 as cubins, plus sm_90 PTX that newer GPUs JIT-compile.
ARCHES = ("80", "90")


class BuildError(RuntimeError):
    """nvcc failed; the message holds the command and its output."""


def wheel_nvcc() -> str | None:
    """nvcc of the PyPI wheels (`pip install nvidia-cuda-nvcc`), if installed."""
    try:
        import nvidia  # type: ignore[import-not-found]
    except ImportError:
        return None
    for root in getattr(nvidia, "__path__", []):
        for cand in sorted(glob.glob(os.path.join(root, "cu*", "bin", "nvcc")), reverse=True):
            if os.access(cand, os.X_OK):
                return cand
    return None


def find_nvcc(allow_wheel: bool = False) -> str | None:
    """The nvcc to build with: $SHARDCKPT_NVCC, $CUDA_HOME, PATH, /usr/local/cuda.

    The wheel's nvcc is only taken when asked for (the tests): a machine that
    merely has the build extra installed has no GPU to use the module on.
    """
    env = os.environ.get("SHARDCKPT_NVCC")
    if env:
        return env
    cands = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            cands.append(os.path.join(os.environ[var], "bin", "nvcc"))
    cands += [shutil.which("nvcc") or "", "/usr/local/cuda/bin/nvcc"]
    for c in cands:
        if c and os.access(c, os.X_OK):
            return c
    return wheel_nvcc() if allow_wheel else None


def _run_all(cmds: list[list[str]]) -> None:
    procs = [(c, subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
             for c in cmds]
    errors = []
    for c, p in procs:
        out, _ = p.communicate()
        if p.returncode != 0:
            errors.append(f"$ {' '.join(c)}\n{out}")
    if errors:
        raise BuildError("building shardckpt._cuda failed:\n" + "\n".join(errors))


def build(output: str, nvcc: str, *, ccbin: str | None = None, arches: tuple[str, ...] = ARCHES,
          build_dir: str | None = None) -> list[list[str]]:
    """Compile csrc/cuda/* into the extension module `output`; returns the commands run."""
    ccbin = ccbin or os.environ.get("CXX") or "g++"
    build_dir = build_dir or tempfile.mkdtemp(prefix="shardckpt-cuda-")
    os.makedirs(build_dir, exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    gencode = []
    for a in arches:
        gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    gencode += ["-gencode", f"arch=compute_{arches[-1]},code=compute_{arches[-1]}"]
    common = [nvcc, "-O3", "-std=c++17", "-ccbin", ccbin, "-I", HERE,
              "-I", sysconfig.get_paths()["include"],
              "-Xcompiler", "-fPIC,-fvisibility=hidden,-Wall,-Wextra"]
    objs, compiles = [], []
    for src in SOURCES:
        obj = os.path.join(build_dir, os.path.splitext(src)[0] + ".o")
        compiles.append(common + gencode + ["-c", os.path.join(HERE, src), "-o", obj])
        objs.append(obj)
    _run_all(compiles)
    # The runtime is linked statically (nvcc's default) so the module needs no
    # libcudart.so at import; --exclude-libs keeps its symbols private so they
    # can never interpose on torch's own libcudart.
    link = [nvcc, "-shared", "-cudart", "static", "-ccbin", ccbin, *gencode, "-o", output, *objs,
            "-Xlinker", "--exclude-libs,ALL"]
    _run_all([link])
    return compiles + [link]


def ext_suffix() -> str:
    return sysconfig.get_config_var("EXT_SUFFIX") or ".so"
