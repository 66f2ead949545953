"""A worker's place in its group: which partitions of the sources topic it holds, and whether it still does.

The workers of a group are members of one Kafka consumer group on the sources
topic; a worker runs the sources whose records lie in its partitions, as Kafka
Connect's workers run their tasks. aiokafka rebalances eagerly (every member
gives up everything, then takes its new share: it has no cooperative
protocol), so `SourceAssignor` keeps the moves few instead: each member keeps
what it held unless that leaves the group uneven, and the sources, not the
partitions, are spread evenly (a partition may hold several sources, or none).

A member that stops hearing from the group (frozen, cut off) is dropped by the
coordinator after the session timeout and its sources given to others, while
it may still be capturing. So a worker publishes only under a lease: from the
sending of its last heartbeat the coordinator answered, less than the session
timeout ago, and not during a rebalance. Past it, publishing waits until the
group has answered again; and since the others may have run its sources
meanwhile, it then stops all of them, and starts afresh (from their progress)
those the new assignment gives it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.cluster import ClusterMetadata
from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment, ConsumerProtocolMemberMetadata
from aiokafka.errors import KafkaError

from pipeline.kafka import (
    GROUP_HEARTBEAT_INTERVAL_MS,
    GROUP_SESSION_TIMEOUT_MS,
    KafkaConnection,
    client_options,
    partitions_of,
    unreachable,
)

log = logging.getLogger("framelabel.cluster")

POLL_TIMEOUT_MS = 500

Weights = Callable[[], Mapping[int, int]]  # partition → the sources it holds now


def balance(partitions: list[int], weights: Mapping[int, int], owned: Mapping[str, set[int]]) -> dict[str, set[int]]:
    """Partitions for each member: the sources spread evenly, moving as few as that takes.

    `owned`: what each member held before. A member keeps its partitions with sources until it holds more
    sources than its share (the total over the members, rounded up); what is left goes, heaviest first, to the
    member holding the fewest sources. Partitions without sources go to whoever holds the fewest partitions."""
    members = sorted(owned)
    result: dict[str, set[int]] = {member: set() for member in members}
    if not members:
        return result

    def load(member: str) -> int:
        return sum(weights.get(partition, 0) for partition in result[member])

    existing, taken = set(partitions), set()
    share = math.ceil(sum(weights.get(partition, 0) for partition in partitions) / len(members))
    for member in members:
        kept = sorted((p for p in owned[member] if p in existing and weights.get(p, 0)), key=lambda p: -weights[p])
        for partition in kept:
            if partition not in taken and load(member) + weights[partition] <= share:
                result[member].add(partition)
                taken.add(partition)
    free = [partition for partition in partitions if partition not in taken]
    for partition in sorted((p for p in free if weights.get(p, 0)), key=lambda p: (-weights[p], p)):
        lightest = min(members, key=lambda member: (load(member), len(result[member]), member))
        result[lightest].add(partition)
    for partition in (p for p in free if not weights.get(p, 0)):
        emptiest = min(members, key=lambda member: (len(result[member]), member))
        result[emptiest].add(partition)
    return result


class SourceAssignor(AbstractPartitionAssignor):  # type: ignore[misc]  # aiokafka is untyped
    """`balance()` as a Kafka partition assignor: each member tells the leader what it holds (its metadata's
    user data); the leader weighs each partition by the sources it holds, as its own catalog knows them."""

    name = "framelabel-sources"
    version = 0

    def __init__(self, weights: Weights) -> None:
        self._weights = weights
        self.held: set[int] = set()

    def metadata(self, topics: set[str]) -> ConsumerProtocolMemberMetadata:
        return ConsumerProtocolMemberMetadata(self.version, sorted(topics), json.dumps(sorted(self.held)).encode())

    def on_assignment(self, assignment: ConsumerProtocolMemberAssignment) -> None:
        self.held = {partition.partition for partition in assignment.partitions()}

    def assign(
        self, cluster: ClusterMetadata, members: Mapping[str, ConsumerProtocolMemberMetadata]
    ) -> dict[str, ConsumerProtocolMemberAssignment]:
        topics = sorted({topic for metadata in members.values() for topic in metadata.subscription})
        if len(topics) != 1:
            raise ValueError(f"a group of workers reads one sources topic, not {topics}")
        (topic,) = topics
        partitions = sorted(cluster.partitions_for_topic(topic) or ())
        owned = {member: _held(metadata.user_data) for member, metadata in members.items()}
        shares = balance(partitions, self._weights(), owned)
        log.info("assigning the sources topic's partitions: %s", {m: sorted(p) for m, p in shares.items()})
        return {
            member: ConsumerProtocolMemberAssignment(self.version, [(topic, sorted(share))], b"")
            for member, share in shares.items()
        }


def _held(user_data: bytes | None) -> set[int]:
    try:
        return {int(partition) for partition in json.loads(user_data or b"[]")}
    except (ValueError, TypeError):
        return set()  # a member of another version: it holds nothing we can keep


class SoleMember:
    """Every partition of the sources topic, without joining the group: one worker runs every source.

    For brokers whose consumer groups do not settle after a member dies (noida-db): a restarted worker goes
    on at once. A second sole worker would fence the first replay by replay through the transactional ids,
    so run one at a time."""

    def __init__(self, connection: KafkaConnection, topic: str, on_change: Callable[[set[int]], Awaitable[None]]):
        self._connection = connection
        self._topic = topic
        self._on_change = on_change

    def current(self) -> bool:
        return True

    async def wait_for_change(self, timeout_s: float) -> None:
        await asyncio.sleep(timeout_s)

    async def __aenter__(self) -> SoleMember:
        await self._on_change(await partitions_of(self._connection, self._topic))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None


class Membership:
    """`async with` it: joins the group; `on_change(partitions)` is awaited after every rebalance, and must
    stop publishing for what it lost before its first await."""

    def __init__(
        self,
        connection: KafkaConnection,
        topic: str,
        group: str,
        weights: Weights,
        on_change: Callable[[set[int]], Awaitable[None]],
        session_timeout_ms: int = GROUP_SESSION_TIMEOUT_MS,
    ) -> None:
        self._connection = connection
        self._topic = topic
        self._group = group
        self._on_change = on_change
        self._session_s = session_timeout_ms / 1000
        self._assignor = SourceAssignor(weights)
        self._consumer = AIOKafkaConsumer(
            **client_options(connection),
            group_id=group,
            enable_auto_commit=False,
            partition_assignment_strategy=(self._assignor,),
            session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=GROUP_HEARTBEAT_INTERVAL_MS,
        )
        self._settled = False  # False during a rebalance, and until the first one is over
        self._lapsed = False  # the session ran out before this rebalance: nothing held before is ours
        self._lease_from = -math.inf  # time.monotonic() when the coordinator last heard from us, as far as we know
        self._changed = asyncio.Event()
        self._poller: asyncio.Task[None] | None = None

    def current(self) -> bool:
        """Whether the group still counts on this member for what it holds (the lease has not run out)."""
        margin_s = GROUP_HEARTBEAT_INTERVAL_MS / 1000
        return self._settled and time.monotonic() - self._lease_from < self._session_s - margin_s

    async def wait_for_change(self, timeout_s: float) -> None:
        """Until the next rebalance ends, or `timeout_s`."""
        self._changed.clear()
        try:
            async with asyncio.timeout(timeout_s):
                await self._changed.wait()
        except TimeoutError:
            pass

    async def __aenter__(self) -> Membership:
        try:
            await self._consumer.start()
        except KafkaError as exc:
            raise unreachable(self._connection, exc) from exc
        self._watch_heartbeats()
        self._consumer.subscribe([self._topic], listener=_Listener(self))
        # the group needs the member to poll; what it reads is ignored (the catalog reads the whole topic)
        self._poller = asyncio.create_task(self._poll(), name="framelabel-membership")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        await self._consumer.stop()  # leaves the group: the others take the sources at once

    async def _poll(self) -> None:
        while True:
            try:
                await self._consumer.getmany(timeout_ms=POLL_TIMEOUT_MS)
            except KafkaError as exc:
                log.warning("group %s: %r", self._group, exc)
                await asyncio.sleep(POLL_TIMEOUT_MS / 1000)

    def _watch_heartbeats(self) -> None:
        """Renew the lease on each heartbeat the coordinator answers, from the moment it was sent.

        aiokafka keeps the time of its last good heartbeat to itself, so its heartbeat call is wrapped."""
        coordinator: Any = self._consumer._coordinator
        heartbeat = coordinator._do_heartbeat

        async def timed_heartbeat() -> bool:
            sent_at = time.monotonic()
            answered: bool = await heartbeat()
            if answered:
                self._lease_from = sent_at
            return answered

        coordinator._do_heartbeat = timed_heartbeat

    async def _revoked(self) -> None:
        if self._settled and not self.current():
            # the group went on without us (we were frozen, or cut off): what we held may have run elsewhere
            # since, so none of it is ours any more, even if the next assignment gives it back
            self._lapsed = True
            self._assignor.held = set()
            log.warning("group %s: this worker's session lapsed; its sources will start afresh", self._group)
        self._settled = False
        log.info("group %s: rebalancing; publishing waits", self._group)

    async def _assigned(self, partitions: set[int]) -> None:
        # settled before `on_change` stops what moved away: its records may be waiting behind other sources'
        # (the publisher's room is shared), so those must flow; `on_change` must forget what it lost before
        # its first await, so that nothing of it is published meanwhile
        self._lease_from = time.monotonic()
        self._settled = True
        self._changed.set()
        if self._lapsed:
            self._lapsed = False
            await self._on_change(set())  # stop everything: the sources given back start from their progress
        await self._on_change(partitions)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka is untyped
    def __init__(self, membership: Membership) -> None:
        self._membership = membership

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._membership._revoked()

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._membership._assigned({partition.partition for partition in assigned})
