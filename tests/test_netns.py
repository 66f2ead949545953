"""The separate-hosts harness (tests/netns.py) with real parts: Tansu on the broker side, aiokafka on the hosts."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.kafka import KafkaSettings, ensure_topic
from tests.cameras import wait_until
from tests.kafka import raw_records
from tests.netns import CUT_TABLE, Namespace, Network, network, ours, remove_stale, running, tansu_broker, unavailable

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))

REPOSITORY = Path(__file__).resolve().parents[1]
TOPIC = "pings"
REACH_TIMEOUT_S = 30.0

# One long-lived producer: each line on its stdin is a record to send, and it answers "ok" once the broker
# has acknowledged it, or "failed ERROR" after 2 s. The same client lives through the cut and the heal.
PRODUCER = """
import asyncio, sys
from aiokafka import AIOKafkaProducer

async def main(bootstrap, topic):
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False, request_timeout_ms=1000)
    await producer.start()
    try:
        while value := (await asyncio.to_thread(sys.stdin.readline)).strip():
            try:
                await asyncio.wait_for(producer.send_and_wait(topic, value.encode()), 2)
                print("ok", flush=True)
            except Exception as exc:
                print("failed", type(exc).__name__, flush=True)
    finally:
        await producer.stop()

asyncio.run(main(*sys.argv[1:]))
"""


class Producer:
    """PRODUCER running on one host; `sends()` asks it for one record and says whether the broker took it."""

    def __init__(self, net: Network, host: Namespace, bootstrap: str) -> None:
        self.host = host
        self.sent: list[str] = []
        self.acknowledged: list[str] = []
        self._process: subprocess.Popen[str] = net.start(
            host,
            [sys.executable, "-c", PRODUCER, bootstrap, TOPIC],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def sends(self) -> bool:
        assert self._process.stdin is not None
        assert self._process.stdout is not None
        value = f"{self.host.name}/{len(self.sent)}"
        self.sent.append(value)
        self._process.stdin.write(value + "\n")
        self._process.stdin.flush()
        answer = self._process.stdout.readline()
        if not answer:
            raise AssertionError(f"the producer on {self.host.name} exited with {self._process.wait()}")
        if answer.strip() == "ok":
            self.acknowledged.append(value)
        return answer.strip() == "ok"

    def close(self) -> None:
        """End of input: the producer flushes, stops, and exits."""
        assert self._process.stdin is not None
        self._process.stdin.close()
        self._process.wait(REACH_TIMEOUT_S)


def test_a_cut_host_loses_the_broker_and_a_healed_one_reaches_it_again() -> None:
    with network(hosts=2) as net, tansu_broker(net) as bootstrap:
        # The test process itself reaches the broker (it creates the topic and reads it back).
        asyncio.run(ensure_topic(KafkaSettings(bootstrap_servers=bootstrap, topic=TOPIC, partitions=1)))
        a, b = Producer(net, net.hosts[0], bootstrap), Producer(net, net.hosts[1], bootstrap)
        wait_until(a.sends, "host A to reach the broker", REACH_TIMEOUT_S)

        net.cut(a.host)
        wait_until(lambda: not a.sends(), "host A to lose the broker", REACH_TIMEOUT_S)
        assert b.sends(), "host B, not cut, lost the broker too"

        net.heal(a.host)
        wait_until(a.sends, "host A to reach the broker again", REACH_TIMEOUT_S)
        a.close()
        b.close()

        # A send that timed out may still land later, so read as many as were sent (or until the deadline).
        records = asyncio.run(raw_records(bootstrap, TOPIC, len(a.sent + b.sent)))
        assert set(a.acknowledged + b.acknowledged) <= {record.value.decode() for record in records if record.value}
    # Namespaces, links and nft tables, as `ip netns list`, `ip link` and `nft list tables` show them.
    assert [name for name in ours() if name.startswith(net.name) or name == CUT_TABLE] == []


def test_what_a_crashed_run_left_is_removed_by_the_next() -> None:
    crash = """
import os, subprocess
from tests.netns import network
run = network(hosts=1)  # kept: a context manager collected as garbage would clean up
net = run.__enter__()
sleeper = net.start(net.hosts[0], ["sleep", "600"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(net.name, sleeper.pid, flush=True)
os._exit(1)  # no clean-up: a crash
"""
    done = subprocess.run([sys.executable, "-c", crash], cwd=REPOSITORY, capture_output=True, text=True, check=False)
    assert done.returncode == 1, done.stderr
    name, sleeper = done.stdout.split()
    try:
        assert sorted(n for n in ours() if n.startswith(name)) == [name, f"{name}-broker", f"{name}-h0"]
    finally:
        remove_stale()

    assert [n for n in ours() if n.startswith(name)] == []
    wait_until(lambda: not running(int(sleeper)), "the crashed run's process to be killed")
