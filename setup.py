"""Build of the optional native codec, shardckpt._native (metadata is in pyproject.toml).

The extension is an accelerator, never a requirement: if the compiler or zlib
is missing, or the build fails for any other reason, the install goes on
without it and shardckpt uses its pure-Python codec (same format, slower).
Set SHARDCKPT_REQUIRE_NATIVE=1 to make a failed build fail the install (CI).
Set SHARDCKPT_NO_NATIVE=1 to skip the build.

The GPU data path, shardckpt._cuda (csrc/cuda/, docs/GPU.md), is a second,
separate extension built with nvcc only when nvcc is found ($SHARDCKPT_NVCC,
$CUDA_HOME, PATH); SHARDCKPT_NO_CUDA=1 skips it. Same rule: a failed build
warns and the install goes on (SHARDCKPT_REQUIRE_CUDA=1 makes it fail).
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ZSTD_DIR = "csrc/third_party/zstd"
REQUIRE = os.environ.get("SHARDCKPT_REQUIRE_NATIVE") == "1"


class OptionalBuildExt(build_ext):
    def build_extensions(self) -> None:
        compiler = self.compiler
        original_compile = compiler._compile

        # One flag set cannot serve both languages: zstd.c is C (and is not
        # ours to make -Wall clean), our sources are C++17.
        def _compile(obj, src, ext, cc_args, extra_postargs, pp_opts):
            extra = list(extra_postargs)
            if src.endswith(".cpp"):
                extra += ["-std=c++17", "-Wall", "-Wextra"]
            original_compile(obj, src, ext, cc_args, extra, pp_opts)

        compiler._compile = _compile

        # setuptools compiles an extension's sources one after another; the
        # zstd amalgamation alone takes most of the build, so compile the files
        # concurrently (it keeps `pip install` short on small machines).
        original_compile_many = compiler.compile

        def compile_many(sources, output_dir=None, macros=None, include_dirs=None, debug=0,
                         extra_preargs=None, extra_postargs=None, depends=None):
            for obj in compiler.object_filenames(sources, output_dir=output_dir):
                os.makedirs(os.path.dirname(obj) or ".", exist_ok=True)

            def one(src):
                return original_compile_many([src], output_dir, macros, include_dirs, debug,
                                             extra_preargs, extra_postargs, depends)

            with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as ex:
                results = list(ex.map(one, sources))
            return [o for objs in results for o in objs]

        compiler.compile = compile_many
        super().build_extensions()

    def build_extension(self, ext: Extension) -> None:
        if os.environ.get("SHARDCKPT_NO_NATIVE") == "1":
            print("shardckpt: SHARDCKPT_NO_NATIVE=1, skipping the native codec", file=sys.stderr)
            return
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001 - any build failure must not fail the install
            if REQUIRE:
                raise
            print(f"WARNING: shardckpt: building the native codec failed ({e}); "
                  "installing without it, the pure-Python codec will be used.", file=sys.stderr)

    def run(self) -> None:
        try:
            super().run()
        except Exception as e:  # noqa: BLE001 - e.g. no compiler at all
            if REQUIRE:
                raise
            print(f"WARNING: shardckpt: native codec not built ({e}); "
                  "the pure-Python codec will be used.", file=sys.stderr)


native = Extension(
    "shardckpt._native",
    sources=["csrc/module.cpp", "csrc/codec.cpp", "csrc/planes.cpp", "csrc/huf_frame.cpp",
             "csrc/block_hash.cpp", "csrc/xxh_dispatch.c", "csrc/records.cpp",
             "csrc/crc32_fast.cpp", f"{ZSTD_DIR}/zstd.c"],
    include_dirs=["csrc", ZSTD_DIR],
    depends=["csrc/codec.h", "csrc/crc32_fast.h", "csrc/planes.h", "csrc/huf_frame.h",
             "csrc/block_hash.h", "csrc/records.h", "csrc/thread_pool.h", f"{ZSTD_DIR}/zstd.h",
             "csrc/third_party/xxhash/xxhash.h",
             "csrc/third_party/xxhash/xxh_x86dispatch.c"],
    # Blocks are parallelised by our own pool, one single-threaded zstd context
    # per thread; ZSTD_c_nbWorkers is never set, so zstd starts no threads
    # (the amalgamation compiles its MT support in unconditionally). Empty
    # *_VISIBLE keeps zstd's symbols private to this module, as
    # python-zstandard does, so the two bundled copies cannot interpose.
    define_macros=[("ZSTDLIB_VISIBLE", ""), ("ZDICTLIB_VISIBLE", ""),
                   ("ZSTDERRORLIB_VISIBLE", "")],
    # -g0: debug info for the 2 MB zstd amalgamation slows the build and
    # bloats the .so (Python's default CFLAGS carry -g).
    extra_compile_args=["-O3", "-g0", "-fvisibility=hidden"],
    libraries=["z"],
    language="c++",
)



# -- the GPU data path: its own extension, built by csrc/cuda/build_cuda.py with nvcc.
def _load_cuda_build():
    import importlib.util

    spec = importlib.util.spec_from_file_location("shardckpt_build_cuda",
                                                  "csrc/cuda/build_cuda.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class BuildExt(OptionalBuildExt):
    def build_extension(self, ext: Extension) -> None:
        if ext.name != "shardckpt._cuda":
            return super().build_extension(ext)
        out = self.get_ext_fullpath(ext.name)
        try:
            cmds = cuda_build.build(out, NVCC, build_dir=os.path.join(self.build_temp, "cuda"))
            print("shardckpt: built shardckpt._cuda with " + NVCC + "\n" +
                  "\n".join(" ".join(c) for c in cmds), file=sys.stderr)
        except Exception as e:  # noqa: BLE001 - the GPU path is optional too
            if os.environ.get("SHARDCKPT_REQUIRE_CUDA") == "1":
                raise
            print(f"WARNING: shardckpt: building the CUDA extension failed ({e}); "
                  "installing without it, GPU tensors are staged by torch copies.",
                  file=sys.stderr)


cuda_build = _load_cuda_build()
NVCC = None if os.environ.get("SHARDCKPT_NO_CUDA") == "1" else cuda_build.find_nvcc()
ext_modules = [native]
if NVCC is not None:
    ext_modules.append(Extension(
        "shardckpt._cuda",
        sources=[f"csrc/cuda/{s}" for s in cuda_build.SOURCES],
        depends=[f"csrc/cuda/{s}" for s in cuda_build.DEPENDS]))
else:
    print("shardckpt: no nvcc found (SHARDCKPT_NVCC, CUDA_HOME, PATH) or SHARDCKPT_NO_CUDA=1: "
          "the CUDA extension shardckpt._cuda is not built; GPU tensors are staged by torch "
          "copies (docs/GPU.md).", file=sys.stderr)

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
