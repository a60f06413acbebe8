"""DCP integration: the storage plugins, the load planner, the object-safety policy."""

from .planner import SafeLoadPlanner, SafeSavePlanner
from .reader import ShardReader
from .writer import ShardWriter

__all__ = ["SafeLoadPlanner", "SafeSavePlanner", "ShardReader", "ShardWriter"]
