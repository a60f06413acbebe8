"""Hypothesis for the unit tests: no example database on disk, no deadline."""

from hypothesis import settings

settings.register_profile("unit", database=None, deadline=None)
settings.load_profile("unit")
