"""Unit tests: the cache policy (admission, LRU eviction, pins, idle time-outs), no Ray."""

from __future__ import annotations

import pytest

from server.deploy.cache_policy import CachePolicy, Placement, Refusal

MIB = 1 << 20
ONE_NODE = {"node-a": 100 * MIB}  # budget 50 MiB at fraction 0.5


def _loaded(policy: CachePolicy, model_id: str, nbytes: int, now: float, *, node: str = "node-a", pinned: bool = False, ttl: float = 0) -> None:
    policy.reserve(model_id, node, nbytes, pinned=pinned, idle_ttl_seconds=ttl, now=now)
    policy.loaded(model_id, node, node, nbytes)


def test_a_model_that_fits_is_placed_without_evictions() -> None:
    policy = CachePolicy(0.5)
    _loaded(policy, "a", 20 * MIB, now=0)
    assert policy.place(20 * MIB, ONE_NODE) == Placement("node-a", [])


def test_the_least_recently_used_model_is_evicted_first_not_a_recently_used_one() -> None:
    policy = CachePolicy(0.5)
    for index, model_id in enumerate(("a", "b", "c")):
        _loaded(policy, model_id, 15 * MIB, now=index)
    policy.touch("a", now=10)  # a plugin used "a": "b" is now the least recently used
    placement = policy.place(15 * MIB, ONE_NODE)
    assert isinstance(placement, Placement)
    assert [r.model_id for r in placement.evict] == ["b"]


def test_pinned_and_loading_models_are_never_evicted_and_count_against_admission() -> None:
    policy = CachePolicy(0.5)
    _loaded(policy, "pinned", 30 * MIB, now=0, pinned=True)
    policy.reserve("loading", "node-a", 10 * MIB, pinned=False, idle_ttl_seconds=0, now=1)
    _loaded(policy, "old", 10 * MIB, now=2)
    placement = policy.place(10 * MIB, ONE_NODE)
    assert isinstance(placement, Placement) and [r.model_id for r in placement.evict] == ["old"]
    refused = policy.place(11 * MIB, ONE_NODE)
    assert refused == Refusal(needs=11 * MIB, budget=50 * MIB, pinned=40 * MIB, capacity=100 * MIB)
    assert "needs 11534336 bytes" in refused.message and "41943040 of which are pinned" in refused.message


def test_a_model_larger_than_any_nodes_budget_is_refused_with_the_numbers() -> None:
    policy = CachePolicy(0.5)
    refused = policy.place(80 * MIB, {"small": 40 * MIB, "large": 100 * MIB})
    assert refused == Refusal(needs=80 * MIB, budget=50 * MIB, pinned=0, capacity=100 * MIB)


def test_the_node_needing_the_fewest_evicted_bytes_is_chosen() -> None:
    policy = CachePolicy(0.5)
    _loaded(policy, "a", 40 * MIB, now=0, node="busy")
    _loaded(policy, "b", 10 * MIB, now=0, node="quiet")
    placement = policy.place(30 * MIB, {"busy": 100 * MIB, "quiet": 100 * MIB})
    assert placement == Placement("quiet", [])


def test_idle_models_time_out_and_a_use_resets_the_clock() -> None:
    policy = CachePolicy(0.5)
    _loaded(policy, "short", MIB, now=0, ttl=60)
    _loaded(policy, "forever", MIB, now=0)
    assert policy.idle(now=59) == []
    policy.touch("short", now=50)
    assert policy.idle(now=100) == []
    assert [r.model_id for r in policy.idle(now=110)] == ["short"]


def test_a_later_deploy_can_pin_a_cached_model() -> None:
    policy = CachePolicy(0.5)
    _loaded(policy, "a", 40 * MIB, now=0)
    policy.set_options("a", pinned=True, idle_ttl_seconds=None)
    assert isinstance(policy.place(20 * MIB, ONE_NODE), Refusal)


def test_the_budget_fraction_is_validated() -> None:
    with pytest.raises(ValueError):
        CachePolicy(1.5)


def test_copies_on_two_nodes_are_evicted_each_on_its_own_node() -> None:
    policy = CachePolicy(0.5)
    two_nodes = {"node-a": 100 * MIB, "node-b": 100 * MIB}
    _loaded(policy, "everywhere", 30 * MIB, now=0, node="node-a")
    _loaded(policy, "everywhere", 30 * MIB, now=0, node="node-b")
    _loaded(policy, "recent", 20 * MIB, now=5, node="node-b")
    # node-b must lose its copy of "everywhere" (least recently used there); node-a keeps its own.
    placement = policy.place(25 * MIB, {"node-b": two_nodes["node-b"]})
    assert isinstance(placement, Placement)
    assert [(r.model_id, r.node_id) for r in placement.evict] == [("everywhere", "node-b")]
    policy.remove_copy("everywhere", "node-b")
    assert [r.node_id for r in policy.copies("everywhere")] == ["node-a"]


def test_a_use_touches_every_copy_and_a_removal_forgets_them_all() -> None:
    policy = CachePolicy(0.5)
    _loaded(policy, "everywhere", MIB, now=0, node="node-a", ttl=60)
    _loaded(policy, "everywhere", MIB, now=0, node="node-b", ttl=60)
    policy.touch("everywhere", now=50)
    assert policy.idle(now=100) == []
    assert {r.node_id for r in policy.idle(now=110)} == {"node-a", "node-b"}
    assert {r.node_id for r in policy.remove("everywhere")} == {"node-a", "node-b"}
    assert policy.residents() == []


def test_a_load_that_ran_on_another_node_is_counted_where_it_ran() -> None:
    policy = CachePolicy(0.5)
    policy.reserve("moved", "node-a", 10 * MIB, pinned=False, idle_ttl_seconds=0, now=0)
    policy.loaded("moved", "node-a", "node-b", 12 * MIB)
    assert [(r.node_id, r.nbytes, r.loading) for r in policy.copies("moved")] == [("node-b", 12 * MIB, False)]
