"""Checkpoint management: orchestration, retention, pointers, leases, collectives, preemption."""

from .catalog import CheckpointInfo, ManagerSaveResult, latest, list_checkpoints
from .manager import CheckpointManager
from .names import BEST_POINTER, LATEST_POINTER, parse_step, step_dir_name
from .retention import AnyOf, BestN, EveryN, LastN, retained_steps

__all__ = ["CheckpointManager", "CheckpointInfo", "ManagerSaveResult", "list_checkpoints", "latest", "retained_steps",
           "LastN", "BestN", "EveryN", "AnyOf", "LATEST_POINTER", "BEST_POINTER", "parse_step",
           "step_dir_name"]
