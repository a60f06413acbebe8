"""Print the report of scripts/demo.sh from the runs' metrics and summaries.

Reads, under --out: run1.jsonl (the interrupted run's per-step record, which
survives a SIGKILL), run2.jsonl / run2.json (the resumed run) and ckpt/. Exits 1
when the losses of the steps computed by both runs differ by more than --tol.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut short by the kill: everything before it is good
    return records


def losses(records: list[dict[str, Any]]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if r.get("event") == "step"}


def saves(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("event") == "save"]


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def tree(path: Path, limit: int = 14) -> list[str]:
    files = sorted(f for f in path.rglob("*") if f.is_file())
    lines = [f"    {str(f.relative_to(path)):<40} {human(f.stat().st_size):>10}" for f in files[:limit]]
    if len(files) > limit:
        lines.append(f"    ... and {len(files) - limit} more files")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--interrupt", default="exit")
    p.add_argument("--tol", type=float, default=0.05,
                   help="largest accepted |loss before - loss after| on a recomputed step")
    args = p.parse_args(argv)

    run1, run2 = read_jsonl(args.out / "run1.jsonl"), read_jsonl(args.out / "run2.jsonl")
    summary2 = json.loads((args.out / "run2.json").read_text())
    l1, l2 = losses(run1), losses(run2)
    if not l1 or not l2:
        print("demo_report: missing step records; see the run logs", file=sys.stderr)
        return 1
    w1 = next((r["world_size"] for r in run1 if "world_size" in r), "?")
    crash_step = max(l1)
    resumed = summary2.get("resumed_from_step")
    if resumed is None:
        print("demo_report: the second run did not resume from a checkpoint", file=sys.stderr)
        return 1
    overlap = sorted(set(l1) & set(l2))

    print(f"  world size        : {w1} processes -> crash -> {summary2['world_size']} processes "
          f"({summary2['backend']})")
    print(f"  interruption      : after step {crash_step} "
          f"({'os._exit(17) on every rank' if args.interrupt == 'exit' else 'SIGKILL'})")
    print(f"  resumed at step   : {resumed}  from {summary2['resumed_from']}")
    print(f"  loss              : {l1[min(l1)]:.4f} (step {min(l1)}) -> {l1[crash_step]:.4f} "
          f"(step {crash_step}, before the crash) -> {summary2['last_loss']:.4f} "
          f"(step {summary2['last_step']}, end)   floor ~{summary2.get('loss_floor', 0):.3f}")
    print(f"  loss at step {resumed:<5d}: {l1.get(resumed, float('nan')):.4f} "
          f"(the last step in the checkpoint)")

    ok = True
    if overlap:
        diffs = {s: abs(l1[s] - l2[s]) for s in overlap}
        worst = max(diffs.values())
        ok = worst <= args.tol
        print(f"  steps {overlap[0]}..{overlap[-1]} ran twice, on {w1} ranks before the crash and "
              f"on {summary2['world_size']} after the resume (same data, same state):")
        print("      step   loss before   loss after     |diff|")
        shown = overlap if len(overlap) <= 8 else overlap[:3] + overlap[-3:]
        for i, s in enumerate(shown):
            if i == 3 and len(overlap) > 8:
                print("       ...")
            print(f"    {s:6d}   {l1[s]:11.4f}   {l2[s]:10.4f}   {diffs[s]:.2e}")
        print(f"    max |diff| = {worst:.2e}  (tolerance {args.tol}: {'OK' if ok else 'TOO LARGE'}; "
              f"only float summation order differs between {w1} and "
              f"{summary2['world_size']} ranks)")
    else:
        print("  (no step ran in both runs: the crash came right after a save)")

    all_saves = saves(run1) + saves(run2)
    if all_saves:
        secs = [s["seconds"] for s in all_saves]
        per_save = ", ".join(f"step {s['step']}: {s['seconds']:.3f}s" for s in all_saves)
        print(f"  save time         : {per_save}   (mean {sum(secs) / len(secs):.3f}s)")
    print(f"  load time         : {summary2['load_seconds']:.3f}s "
          f"(checkpoint of {w1} ranks read by {summary2['world_size']})")
    ckpt_dir = Path(summary2["resumed_from"]).parent
    committed = sorted(d for d in ckpt_dir.glob("step_*") if (d / "manifest.json").is_file())
    total = sum(f.stat().st_size for d in committed for f in d.rglob("*") if f.is_file())
    if all_saves:
        print(f"  bytes on disk     : {human(all_saves[-1]['bytes'])} per checkpoint, "
              f"{human(total)} for {len(committed)} committed checkpoints")
    resumed_path = Path(summary2["resumed_from"])
    print(f"  files in {resumed_path.name} (written by {w1} ranks):")
    print("\n".join(tree(resumed_path)))
    print(f"\n  RESULT: {'PASS' if ok else 'FAIL'}: resumed at step {resumed} on "
          f"{summary2['world_size']} ranks, training continued to step {summary2['last_step']}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
