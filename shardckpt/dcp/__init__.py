"""DCP integration: the storage plugins, the load planner, the object-safety policy."""

from .planner import SafeLoadPlanner
from .reader import ShardReader
from .writer import ShardWriter

__all__ = ["SafeLoadPlanner", "ShardReader", "ShardWriter"]
