"""What plans and compensation statistics are keyed by: a kind of unit and the module that holds them."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from core.importance.statistics import InputStats


class UnitKind(StrEnum):
    CHANNELS = "channels"  # output channels of a Conv/Linear, and everything coupled to them
    HEADS = "heads"  # the heads of a recognised attention module
    READERS = "readers"  # input columns of a Linear that reads removed channels (compensation only)


@dataclass(frozen=True)
class UnitKey:
    kind: UnitKind
    name: str  # the group's root module, the attention module, or the reading Linear

    def __str__(self) -> str:
        # how reports name a group: channels by their root module, heads as "heads:<attention module>"
        return self.name if self.kind is UnitKind.CHANNELS else f"{self.kind}:{self.name}"


# unit key -> (name of the Linear that makes up for the units, statistics of that Linear's inputs).
# Channels and heads: the one consumer of the removed units; readers: the Linear itself, for one that
# loses inputs other than as that consumer (every reader of a residual-stream channel).
Means = dict[UnitKey, tuple[str, InputStats]]

# group key -> unit indices to remove (channels already expanded over the channel groups of
# grouped convolutions)
Plan = dict[UnitKey, list[int]]
