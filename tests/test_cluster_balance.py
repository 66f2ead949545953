"""How a group's partitions of the sources topic are shared: the sources spread evenly, few of them move."""

from __future__ import annotations

from pipeline.cluster.membership import balance

PARTITIONS = list(range(12))


def sources_per_member(shares: dict[str, set[int]], weights: dict[int, int]) -> dict[str, int]:
    return {member: sum(weights.get(p, 0) for p in share) for member, share in shares.items()}


def test_every_partition_goes_to_exactly_one_member() -> None:
    weights = {0: 1, 3: 2, 7: 1}
    shares = balance(PARTITIONS, weights, {"a": set(), "b": set(), "c": set()})
    assigned = sorted(p for share in shares.values() for p in share)
    assert assigned == PARTITIONS


def test_sources_spread_evenly_even_when_partitions_hold_several() -> None:
    weights = {1: 2, 4: 1, 5: 1, 9: 1, 11: 1}  # six sources, two of them in partition 1
    shares = balance(PARTITIONS, weights, {"a": set(), "b": set(), "c": set()})
    assert sorted(sources_per_member(shares, weights).values()) == [2, 2, 2]


def test_a_new_member_takes_sources_from_the_others_and_nothing_else_moves() -> None:
    weights = {p: 1 for p in range(6)}
    before = balance(PARTITIONS, weights, {"a": set(), "b": set()})
    after = balance(PARTITIONS, weights, {"a": before["a"], "b": before["b"], "c": set()})
    assert sorted(sources_per_member(after, weights).values()) == [2, 2, 2]
    moved = [p for p in weights if p not in after["a"] | after["b"] or p in after["c"]]
    assert len(moved) == 2  # the new member's share, one from each of the others
    assert {p for p in before["a"] if weights.get(p)} >= {p for p in after["a"] if weights.get(p)}


def test_a_member_leaving_hands_over_only_its_own_sources() -> None:
    weights = {p: 1 for p in range(6)}
    before = balance(PARTITIONS, weights, {"a": set(), "b": set(), "c": set()})
    after = balance(PARTITIONS, weights, {"a": before["a"], "b": before["b"]})
    for member in ("a", "b"):
        assert {p for p in before[member] if weights.get(p)} <= after[member]
    assert sorted(sources_per_member(after, weights).values()) == [3, 3]


def test_a_claim_on_a_partition_by_two_members_goes_to_one() -> None:
    weights = {0: 1, 1: 1}
    shares = balance(PARTITIONS, weights, {"a": {0, 1}, "b": {0}})
    assert shares["a"].isdisjoint(shares["b"])
    assert sorted(sources_per_member(shares, weights).values()) == [1, 1]


def test_no_members_no_shares() -> None:
    assert balance(PARTITIONS, {0: 1}, {}) == {}
