"""The writer process's entry point (io/writer_process.py), run as a script, not imported:
its CPUs and priority are set before `import torch` (2-3 s of CPU on a 2-core VM) runs
beside the training loop; every thread started later inherits them.

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


if __name__ == "__main__":
    _yield_cpu()
    # The package's root, not this file's directory (its modules would shadow others).
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from shardckpt.io.writer_serve import serve

    serve()
