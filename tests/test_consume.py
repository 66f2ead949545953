"""`framelabel consume` as a user runs it: a group that resumes, a topic waited for, filtered records, bad values."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from pipeline.kafka import KafkaSettings, ensure_topic
from tests.faults import eventually, framelabel_process
from tests.helpers import FRAMELABEL
from tests.kafka import kafka_broker
from tests.test_events_stage import publish, scored_frame


def consumed(stdout: list[str]) -> list[tuple[str, int, list[str]]]:
    lines = [json.loads(line) for line in stdout]
    return [
        (r["source_id"], r["frame_index"], [a["label"]["name"] for a in r["response"]["annotations"]]) for r in lines
    ]


def test_impossible_values_are_refused() -> None:
    for flag, value in (("--min-confidence", "2"), ("--max", "-1"), ("--idle-timeout", "0")):
        done = subprocess.run([FRAMELABEL, "consume", flag, value], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2
        assert f"argument {flag}: {value} is out of range" in done.stderr


async def test_consume_waits_for_its_topic_filters_records_and_resumes_in_a_group(tmp_path: Path) -> None:
    async with kafka_broker() as broker:
        command = ["consume", "--bootstrap", broker.address, "--topic", "frames", "--group", "readers"]
        command += ["--from-beginning", "--min-confidence", "0.5", "--idle-timeout", "2"]
        sure = [scored_frame("cam", i, {"dog": 0.8, "cat": 0.2}) for i in range(0, 6, 2)]
        unsure = [scored_frame("cam", i, {"dog": 0.3, "cat": 0.2}) for i in range(1, 6, 2)]
        # each run stops at the count it should print (the idle timeout is only its bound), not 2 s after it
        with framelabel_process(*command, "--max", "3") as reader:
            await eventually(lambda: "waiting for topic frames" in reader.log(), "the waiting line")
            await ensure_topic(KafkaSettings(bootstrap_servers=broker.address, topic="frames", partitions=1))
            await publish(broker.address, "frames", sorted(sure + unsure, key=lambda f: f.info.index))
            assert await reader.end() == 0
        # the unsure frames are left out, not printed empty; the sure ones keep their sure labels only
        assert consumed(reader.stdout) == [("cam", 0, ["dog"]), ("cam", 2, ["dog"]), ("cam", 4, ["dog"])], reader.log()
        await publish(broker.address, "frames", [scored_frame("cam", 6, {"cat": 0.9})])
        with framelabel_process(*command, "--max", "1") as again:
            assert await again.end() == 0
        assert consumed(again.stdout) == [("cam", 6, ["cat"])]  # the group resumed after what it had read
