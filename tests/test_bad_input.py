"""Bad input to `framelabel run`, as a user would give it: one clear line naming the thing, the other
sources unaffected, a non-zero exit code only when nothing can run. (Sources' own errors are in
test_sources.py; the config model's messages in test_stages.py.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.faults import pipeline_run, write_run_config
from tests.kafka import kafka_broker, read_topic
from tests.test_run import BUNNY, frame_count, run


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("sources: [\n", "not valid YAML at line 2, column 1"),
        ("sources: [{id: a, uri: x.mp4}]\nkafkaa: {topic: t}\n", "kafkaa: Extra inputs are not permitted"),
        (
            "sources: [{id: a, uri: x.mp4}]\nframes_in_flight: many\n",
            "frames_in_flight: Input should be a valid integer",
        ),
        ("sources: {id: a}\n", "sources: Input should be a valid list"),
        (
            "sources: [{id: a, uri: x.mp4}]\nannotator: {kind: grpc, targets: ['h:1'], ca_file: nope.pem}\n",
            "annotator.ca_file: cannot read",
        ),
        (None, "cannot read config"),
    ],
    ids=["yaml-syntax", "unknown-key", "wrong-type", "not-a-list", "missing-ca-file", "missing-config-file"],
)
def test_a_bad_run_config_is_one_clear_line(tmp_path: Path, config: str | None, message: str) -> None:
    path = tmp_path / "run.yaml"
    if config is not None:
        path.write_text(config)
    result = run(str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("framelabel: error: ")
    assert message in lines[-1]
    assert "Traceback" not in result.stderr


async def test_an_unreachable_annotate_service_is_one_clear_line_not_a_wait_forever(tmp_path: Path) -> None:
    async with kafka_broker() as broker:
        annotator = {"kind": "grpc", "targets": ["127.0.0.1:1"], "connect_timeout_seconds": 1}
        config = write_run_config(tmp_path, broker.address, [{"id": "bunny", "uri": str(BUNNY)}], annotator=annotator)
        result = run(str(config))
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("framelabel: error: cannot reach the Annotate service at 127.0.0.1:1 within 1 s")


async def test_corrupt_inputs_are_named_and_the_good_ones_published(tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    for number in range(4):
        cv2.imwrite(str(folder / f"{number:02d}.png"), np.full((48, 64, 3), number * 60, np.uint8))
    (folder / "02b.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a JPEG after all")
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(BUNNY.read_bytes()[: BUNNY.stat().st_size // 3])
    empty = tmp_path / "empty.mp4"
    empty.touch()
    png_named_mp4 = tmp_path / "still.mp4"
    shutil.copy(folder / "00.png", png_named_mp4)
    sources = [
        {"id": "folder", "uri": str(folder)},
        {"id": "truncated", "uri": str(truncated)},
        {"id": "empty", "uri": str(empty)},
        {"id": "still", "uri": str(png_named_mp4)},
        {"id": "bunny", "uri": str(BUNNY), "every_nth": 11},
    ]
    async with kafka_broker() as broker:
        with pipeline_run(write_run_config(tmp_path, broker.address, sources)) as pipeline:
            code = await pipeline.end()
        records = await read_topic(broker.address, "frames", expected=4 + len(range(0, frame_count(BUNNY), 11)))
    assert code == 3, pipeline.log()  # some sources failed (empty, truncated), the others completed
    published = {
        source_id: [r.frame_index for r in records if r.source_id == source_id] for source_id in ("folder", "bunny")
    }
    assert published["folder"] == [0, 1, 2, 3]  # the bad image skipped, the others in name order
    assert published["bunny"] == list(range(0, frame_count(BUNNY), 11))
    log = pipeline.log()
    for named in ("02b.jpg", f"{empty}: the file is empty"):
        assert named in log
    assert pipeline.summary("empty")["published"] == 0
    assert "Traceback" not in log
