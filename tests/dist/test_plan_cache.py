"""Repeated saves of one structure reuse their plans (DCP plan caching via SafeSavePlanner):
counted collectives and store operations of the first and the tenth save, 2 gloo ranks."""

from __future__ import annotations

from tests.workers import plan_cache
from tests.workers.world import run_world


def test_tenth_save_moves_fewer_plan_bytes_and_stays_correct(tmp_path):
    out = run_world(2, plan_cache.repeated_saves, str(tmp_path), 10)
    for rank, res in enumerate(out):
        assert all(res["checks"].values()), f"rank {rank}: {res['checks']}"
        first, tenth = res["per_save"][0], res["per_save"][9]
        print(f"rank {rank}: save 1 {first}\nrank {rank}: save 10 {tenth}")
        # DCP's plan cache keeps the number of collectives (each step still meets
        # every rank) and shrinks what they carry: empty "unchanged" plans.
        assert tenth["collectives"] <= first["collectives"]
        assert tenth["object_ops"] <= first["object_ops"]
    # The coordinator scatters the plans: the tenth sends empty ones; every rank
    # gathers its local plan to it: empty on the tenth.
    for rank, res in enumerate(out):
        first, tenth = res["per_save"][0], res["per_save"][9]
        assert tenth["object_bytes"] < first["object_bytes"] * 0.5, (rank, first, tenth)
