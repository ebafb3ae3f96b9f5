"""What plans and compensation statistics are keyed by."""

from __future__ import annotations

from core.importance.statistics import InputStats

HEADS = "heads:"  # prefix of plan keys that name an attention module's heads

# layer name (or HEADS + attention name) -> (name of the Linear that reads its units, statistics of
# that Linear's inputs); READERS + a Linear's name -> (that name, statistics of its inputs), for a
# Linear that loses inputs other than as the one consumer of removed units (a residual-stream cut)
Means = dict[str, tuple[str, InputStats]]
READERS = "readers:"

# name of a group's root module -> channel indices to remove (already expanded over
# channel groups of grouped convolutions)
Plan = dict[str, list[int]]
