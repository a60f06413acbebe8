"""Offline tools over checkpoints: sources, reshard, convert, diff, audit, inspect, verify, gc, bench."""
