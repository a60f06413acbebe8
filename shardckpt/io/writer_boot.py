"""The writer process's entry point (io/writer_process.py), run as a script, not imported:
its CPUs and priority are set before any import runs beside the training loop; every
thread started later inherits them. It never imports torch (see _bare_package).

argv: socket fd, parent pid, CPUs to keep to ("" for any).
"""

import os
import sys


def _yield_cpu() -> None:
    if sys.argv[3]:
        try:
            os.sched_setaffinity(0, {int(c) for c in sys.argv[3].split(",")})
        except OSError:  # a CPU went away since: anywhere will do
            pass
    # Nice 19, not the 10 of a thread writer: it still gets ~1.5 % of a core it shares, so it
    # is never starved (SCHED_IDLE can be), and a loop that uses every core barely notices
    # it (2-core VM, two training threads: steps +28-35 % at nice 10, +5 % at 19).
    nice = max(0, int(os.environ.get("SHARDCKPT_WRITER_NICE", "19")))
    try:
        os.setpriority(os.PRIO_PROCESS, 0, max(nice, os.getpriority(os.PRIO_PROCESS, 0)))
    except OSError:  # not permitted in some sandboxes: priority is an optimisation
        pass


def _bare_package() -> None:
    """Register `shardckpt` without running its __init__ (the public API, which imports
    torch): the helper needs only io/, codec/ and format/, none of which imports torch at
    import time. Measured on the 2-core VM: the start takes 0.3 s and 26 MB instead of
    2-6 s and 276 MB, per rank."""
    import types

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pkg = types.ModuleType("shardckpt")
    pkg.__path__ = [root]
    pkg.__file__ = os.path.join(root, "__init__.py")
    pkg.__package__ = "shardckpt"
    sys.modules["shardckpt"] = pkg


if __name__ == "__main__":
    _yield_cpu()
    # The package's root, not this file's directory (its modules would shadow others).
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _bare_package()
    from shardckpt.io.writer_serve import serve

    serve()
