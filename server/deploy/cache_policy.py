"""What the model cache may hold: admission, LRU eviction, pins and idle time-outs.

Plain code, no Ray: the cache actor asks it where a model can go and what must leave to
make room, and applies the answers. Unit tests drive it with a fake clock.

The scarce resource is each Ray node's object store. Models get a budget on every node (a
fraction of its capacity: the rest stays free for plugins' own objects, so the store never
has to spill). A model is admitted on a node if it fits in that node's budget once the
least recently used unpinned models there are evicted; pinned bytes are never evicted.

A model may have a copy on several nodes (deployed with `all_nodes`): each copy is a
resident of its own node, evicted on its own; the model stays deployed while one is left.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field


@dataclass
class Resident:
    """A copy of a model's weights that is (or is being loaded) in a node's object store."""

    model_id: str
    node_id: str
    nbytes: int
    pinned: bool
    last_used: float
    """Seconds on the caller's clock (the cache uses epoch seconds)."""
    idle_ttl_seconds: float = 0.0
    """Undeployed after this long unused; 0 keeps it until evicted or undeployed."""
    loading: bool = False
    namespace_id: str = ""


@dataclass(frozen=True)
class Placement:
    """Where a model goes, and which residents leave first (least recently used first)."""

    node_id: str
    evict: list[Resident] = field(default_factory=list)


@dataclass(frozen=True)
class Refusal:
    """No node can take the model, even after evicting everything evictable."""

    needs: int
    budget: int
    """The largest per-node budget of the eligible nodes."""
    pinned: int
    """Pinned (or still loading) bytes on that node."""
    capacity: int
    """That node's object-store capacity."""

    @property
    def message(self) -> str:
        return (
            f"the model needs {self.needs} bytes of object store; the largest node holds {self.capacity} bytes, "
            f"{self.budget} of them for models, {self.pinned} of which are pinned or loading"
        )


class CachePolicy:
    def __init__(self, budget_fraction: float) -> None:
        if not 0 < budget_fraction <= 1:
            raise ValueError("the object-store budget fraction must be in (0, 1]")
        self._fraction = budget_fraction
        # Least recently used first: a use moves a model's copies to the end.
        self._residents: collections.OrderedDict[tuple[str, str], Resident] = collections.OrderedDict()

    def budget(self, capacity: int) -> int:
        return int(capacity * self._fraction)

    def place(self, nbytes: int, capacities: dict[str, int]) -> Placement | Refusal:
        """The node that can take `nbytes` with the fewest evicted bytes, or why none can.

        `capacities` maps each eligible node to its object-store capacity.
        """
        best: Placement | None = None
        best_freed = 0
        largest: Refusal | None = None
        for node_id, capacity in capacities.items():
            budget = self.budget(capacity)
            on_node = [r for r in self._residents.values() if r.node_id == node_id]
            held = sum(r.nbytes for r in on_node)
            fixed = sum(r.nbytes for r in on_node if r.pinned or r.loading)
            if nbytes > budget - fixed:
                if largest is None or budget > largest.budget:
                    largest = Refusal(needs=nbytes, budget=budget, pinned=fixed, capacity=capacity)
                continue
            evict: list[Resident] = []
            freed = 0
            for resident in on_node:  # LRU order
                if held - freed + nbytes <= budget:
                    break
                if resident.pinned or resident.loading:
                    continue
                evict.append(resident)
                freed += resident.nbytes
            if best is None or freed < best_freed:
                best, best_freed = Placement(node_id=node_id, evict=evict), freed
        if best is not None:
            return best
        return largest or Refusal(needs=nbytes, budget=0, pinned=0, capacity=0)

    def reserve(
        self, model_id: str, node_id: str, nbytes: int, *, pinned: bool, idle_ttl_seconds: float, now: float,
        namespace_id: str = "",
    ) -> None:
        """Counts a load (or a copy) under way against its node; it cannot be evicted while
        it loads."""
        key = (model_id, node_id)
        self._residents[key] = Resident(
            model_id, node_id, nbytes, pinned=pinned, last_used=now, idle_ttl_seconds=idle_ttl_seconds, loading=True,
            namespace_id=namespace_id,
        )
        self._residents.move_to_end(key)

    def loaded(self, model_id: str, planned_node_id: str, node_id: str, nbytes: int) -> None:
        """The load finished on `node_id` (Ray may have run it elsewhere than planned): its
        real size and node replace the reservation."""
        resident = self._residents.pop((model_id, planned_node_id), None)
        if resident is not None:
            resident.node_id, resident.nbytes, resident.loading = node_id, nbytes, False
            self._residents[(model_id, node_id)] = resident

    def touch(self, model_id: str, now: float) -> None:
        for resident in self.copies(model_id):
            resident.last_used = now
            self._residents.move_to_end((model_id, resident.node_id))

    def set_options(self, model_id: str, *, pinned: bool | None, idle_ttl_seconds: float | None) -> None:
        """A deploy of a model already cached may pin, unpin or change its idle time-out."""
        for resident in self.copies(model_id):
            if pinned is not None:
                resident.pinned = pinned
            if idle_ttl_seconds is not None:
                resident.idle_ttl_seconds = idle_ttl_seconds

    def copies(self, model_id: str) -> list[Resident]:
        """The model's copies, one per node holding (or loading) it."""
        return [r for (held_id, _), r in self._residents.items() if held_id == model_id]

    def remove(self, model_id: str) -> list[Resident]:
        """Forgets every copy of the model."""
        removed = self.copies(model_id)
        for resident in removed:
            del self._residents[(model_id, resident.node_id)]
        return removed

    def remove_copy(self, model_id: str, node_id: str) -> Resident | None:
        return self._residents.pop((model_id, node_id), None)

    def idle(self, now: float) -> list[Resident]:
        """Copies unused for longer than their idle time-out (pinned ones included: a
        time-out is an explicit request)."""
        return [
            r for r in self._residents.values()
            if not r.loading and r.idle_ttl_seconds > 0 and now - r.last_used >= r.idle_ttl_seconds
        ]

    def residents(self) -> list[Resident]:
        return list(self._residents.values())
