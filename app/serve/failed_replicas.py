"""Engine replicas known to have failed, as this process learned them: every request router here skips them.

An engine replica whose engine stopped (a dead or hung shard worker) stays in Serve's replica set until its next
health check, and looks idle (it refuses at once), so the power of two choices would even prefer it. The ingress adds
a replica the moment one of its requests fails there (``dispatch``: ``EngineFailed`` names it) or the ``LoadBoard``
reports it failed (``board_view``); ``PrefixAffinityRouter`` then leaves it out of every candidate list. A module of its own: Serve
pickles a request router's module by value, so a set defined there would be a private copy, not this process's.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

REMEMBERED = 1024  # ids kept (Serve never reuses a replica id; a replaced replica's id can be forgotten)


class FailedReplicas:
    """Serve replica ids (``ReplicaID.unique_id``) whose engine failed."""

    def __init__(self, capacity: int = REMEMBERED):
        self._ids: OrderedDict[str, None] = OrderedDict()
        self.capacity = capacity

    def add(self, replica: str) -> None:
        if replica:
            self._ids[replica] = None
            while len(self._ids) > self.capacity:
                self._ids.popitem(last=False)

    def __contains__(self, replica: str) -> bool:
        return replica in self._ids

    def healthy(self, replicas: Sequence[Any]) -> list[Any]:
        """Those of Serve's ``RunningReplica``s not known to have failed."""
        return [r for r in replicas if r.replica_id.unique_id not in self._ids]


FAILED = FailedReplicas()
