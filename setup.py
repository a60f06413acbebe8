"""Build of the optional native codec, shardckpt._native (metadata is in pyproject.toml).

The extension is an accelerator, never a requirement: if the compiler or zlib
is missing, or the build fails for any other reason, the install goes on
without it and shardckpt uses its pure-Python codec (same format, slower).
Set SHARDCKPT_REQUIRE_NATIVE=1 to make a failed build fail the install (CI).
Set SHARDCKPT_NO_NATIVE=1 to skip the build.
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
             "csrc/block_hash.cpp", "csrc/records.cpp", f"{ZSTD_DIR}/zstd.c"],
    include_dirs=["csrc", ZSTD_DIR],
    depends=["csrc/codec.h", "csrc/planes.h", "csrc/huf_frame.h", "csrc/block_hash.h",
             "csrc/records.h", "csrc/thread_pool.h", f"{ZSTD_DIR}/zstd.h",
             "csrc/third_party/xxhash/xxhash.h"],
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

setup(ext_modules=[native], cmdclass={"build_ext": OptionalBuildExt})
