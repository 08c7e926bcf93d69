"""Name maps and layout transforms as data: one table per foreign layout, each row
invertible, so the same table reads and writes. Rules never open files."""

from .base import Rule, LayoutOp, expand_rules, map_to_canonical, map_from_canonical

__all__ = ["Rule", "LayoutOp", "expand_rules", "map_to_canonical", "map_from_canonical"]
