"""Capture sources against real files, folders and cameras: what comes out, in what order, and what is counted."""

from __future__ import annotations

import asyncio
import itertools
import re
import select
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing, asynccontextmanager
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.frames import DeliveryPolicy, Frame
from pipeline.sources import Source, SourceError, SourceSettings, open_source, source_policy
from services.errors import ConfigError
from tests.cameras import CLIPS, free_port, http_mjpeg_camera, rtsp_camera

CLIP = CLIPS / "carphone_pristine.mp4"  # 176×144, 120 frames at 29.97 fps: quick to decode
CAMERA_CLIP = CLIPS / "bikes.mp4"  # 640×272, 250 frames at 25 fps
CAMERA = SourceSettings(
    open_timeout_ms=2000, read_timeout_ms=2000, stall_seconds=5, backoff_initial_seconds=0.05, backoff_max_seconds=0.5
)
WAIT_TIMEOUT = 20.0
CLOCK_RESOLUTION_S = 0.001  # float rounding between time.monotonic() readings and the timed waits


@pytest.fixture(autouse=True)
def no_reader_threads_left() -> Iterator[None]:
    yield
    assert [thread.name for thread in threading.enumerate() if thread.name.startswith("source-")] == []


@pytest.fixture(scope="module")
def clip_frame_count() -> int:
    """The clip's frame count by FFmpeg's own decoding, not OpenCV's."""
    command = ["ffprobe", "-v", "error", "-select_streams", "v:0", "-count_frames"]
    command += ["-show_entries", "stream=nb_read_frames", "-of", "csv=p=0", str(CLIP)]
    return int(subprocess.run(command, check=True, capture_output=True, text=True).stdout)


async def read_all(source: Source) -> list[Frame]:
    return [frame async for frame in source.frames()]


async def take(source: Source, count: int) -> list[Frame]:
    """The first `count` frames; the source is closed afterwards."""
    taken: list[Frame] = []
    async with aclosing(source.frames()) as frames:
        async for frame in frames:
            taken.append(frame)
            if len(taken) == count:
                break
    await source.close()
    return taken


@asynccontextmanager
async def consuming(source: Source) -> AsyncIterator[list[Frame]]:
    """Collect the source's frames in a background task; at the end close the source and await the task."""
    collected: list[Frame] = []

    async def collect() -> None:
        async for frame in source.frames():
            collected.append(frame)

    task = asyncio.create_task(collect(), name=f"consume-{source.source_id}")
    try:
        yield collected
    finally:
        await source.close()
        await task


async def eventually(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {WAIT_TIMEOUT:g} s waiting for {what}")
        await asyncio.sleep(0.02)


def positions(frames: list[Frame]) -> list[float]:
    return [frame.info.media_position_ms or 0.0 for frame in frames]


@pytest.mark.parametrize(
    ("uri", "policy"),
    [
        ("rtsp://user:pw@10.0.0.7:554/stream1", DeliveryPolicy.LIVE),
        ("rtsps://cam.example/live", DeliveryPolicy.LIVE),
        ("http://127.0.0.1:8080/cam.mjpg", DeliveryPolicy.LIVE),
        ("https://cam.example/video", DeliveryPolicy.LIVE),
        ("/dev/video0", DeliveryPolicy.LIVE),
        ("0", DeliveryPolicy.LIVE),
        ("frames/*.jpg", DeliveryPolicy.REPLAY),
        ("shots/frame_??.png", DeliveryPolicy.REPLAY),
        ("frames/", DeliveryPolicy.REPLAY),
        (str(CLIPS), DeliveryPolicy.REPLAY),
        (str(CLIP), DeliveryPolicy.REPLAY),
        ("recordings/2024-05-01.mkv", DeliveryPolicy.REPLAY),
        ("rtmp://media.example/live/gate", DeliveryPolicy.LIVE),
        ("srt://10.0.0.9:9000", DeliveryPolicy.LIVE),
        ("udp://239.0.0.1:1234", DeliveryPolicy.LIVE),
        (f"file://{CLIP}", DeliveryPolicy.REPLAY),
        (f"file://{CLIPS}/", DeliveryPolicy.REPLAY),
    ],
)
def test_policy_follows_the_kind_of_source(uri: str, policy: DeliveryPolicy) -> None:
    assert source_policy(uri) is policy
    assert open_source("s", uri, SourceSettings()).policy is policy


def test_an_unknown_scheme_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown scheme rtps:// in rtps://\*\*\*@cam/s: known ones are .*rtsp://"):
        open_source("s", "rtps://user:pw@cam/s", SourceSettings())


def test_rtsp_cameras_of_one_process_share_one_transport() -> None:
    open_source("a", "rtsp://127.0.0.1:8554/a", SourceSettings(rtsp_transport="tcp"))
    with pytest.raises(ConfigError, match="rtsp_transport 'udp'"):
        open_source("b", "rtsp://127.0.0.1:8554/b", SourceSettings(rtsp_transport="udp"))


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"queue_size": 0}, "queue_size"),
        ({"start_ms": 2000.0, "end_ms": 1000.0}, "end_ms"),
        ({"stall_seconds": 2.0}, "stall_seconds"),
        ({"backoff_initial_seconds": 20.0}, "backoff_initial_seconds"),
        ({"rtsp_transport": "carrier-pigeon"}, "rtsp_transport"),
    ],
)
def test_bad_settings_name_the_field(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SourceSettings(**overrides)  # type: ignore[arg-type]


@pytest.mark.parametrize("decoder", ["opencv", "pyav"])
async def test_file_replay_yields_every_frame_in_order(clip_frame_count: int, decoder: str) -> None:
    source = open_source("clip", str(CLIP), SourceSettings.model_validate({"decoder": decoder}))
    assert source.total_frames == clip_frame_count  # known before reading, for progress
    before_ms = time.time_ns() // 1_000_000
    frames = await read_all(source)

    fps = cv2.VideoCapture(str(CLIP)).get(cv2.CAP_PROP_FPS)
    assert len(frames) == source.stats.read == source.total_frames == clip_frame_count == 120
    assert [frame.info.index for frame in frames] == list(range(len(frames)))
    assert positions(frames) == pytest.approx([index * 1000 / fps for index in range(len(frames))], abs=1.0)
    assert all(frame.info.source_id == "clip" for frame in frames)
    assert all(frame.pixels.shape == (144, 176, 3) and frame.pixels.dtype == np.uint8 for frame in frames)
    captured = [frame.info.capture_time_ms for frame in frames]
    assert captured == sorted(captured)
    assert before_ms <= captured[0] <= captured[-1] <= time.time_ns() // 1_000_000
    assert source.stats.dropped == source.stats.errors == 0
    assert source.stats.decoded == 120


async def test_file_replay_starts_and_ends_at_the_offsets() -> None:
    source = open_source("clip", str(CLIP), SourceSettings(start_ms=1000, end_ms=2000))
    frames = await read_all(source)

    frame_ms = 1000 / 29.97
    assert len(frames) == source.total_frames == 30
    assert [frame.info.index for frame in frames] == list(range(30, 60))  # their numbers in the file
    assert 1000 <= positions(frames)[0] < 1000 + frame_ms
    assert 2000 - frame_ms <= positions(frames)[-1] < 2000
    assert positions(frames) == sorted(positions(frames))


async def test_file_replay_loops() -> None:
    source = open_source("clip", str(CLIP), SourceSettings(loop=True, end_ms=500))
    assert source.total_frames is None
    frames = await take(source, 40)

    passes = 1 + sum(later < earlier for earlier, later in itertools.pairwise(positions(frames)))
    assert passes == 3  # 15 frames before 500 ms in each pass
    assert [frame.info.index for frame in frames] == list(range(40))
    assert positions(frames)[15] == positions(frames)[0] == 0.0


async def test_a_slow_consumer_holds_the_reader_back_and_loses_nothing() -> None:
    settings = SourceSettings(queue_size=2)
    source = open_source("clip", str(CLIP), settings)
    received: list[Frame] = []
    read_ahead: list[int] = []
    async for frame in source.frames():
        received.append(frame)
        read_ahead.append(source.stats.read - len(received))
        if len(received) <= 20:
            await asyncio.sleep(0.01)  # a slow stage downstream

    # The queue filled while the consumer was slow, and the reader got no further than one frame waiting to go in.
    assert settings.queue_size <= max(read_ahead) <= settings.queue_size + 1
    assert len(received) == source.stats.read == 120
    assert [frame.info.index for frame in received] == list(range(120))
    assert source.stats.dropped == 0


async def test_realtime_replay_follows_the_file_fps(figures: dict[str, object]) -> None:
    source = open_source("clip", str(CAMERA_CLIP), SourceSettings(realtime=True, end_ms=1000))
    started = time.monotonic()
    frames = await read_all(source)

    assert len(frames) == 25
    # No frame is released before it is due: its media position's offset from the first frame's, counted from
    # before reading began. A loaded machine only makes frames later; how much later is a figure, not a check.
    first = positions(frames)[0]
    early_s = [
        started + (position - first) / 1000 - frame.info.captured_at
        for position, frame in zip(positions(frames), frames, strict=True)
    ]
    assert max(early_s) <= CLOCK_RESOLUTION_S, f"released {max(early_s) * 1000:.1f} ms before it was due"
    figures["realtime replay of 1 s at 25 fps: seconds from first to last frame (0.96 due)"] = (
        frames[-1].info.captured_at - frames[0].info.captured_at
    )


async def test_cancelling_the_consumer_stops_the_reader() -> None:
    source = open_source("clip", str(CLIP), SourceSettings(realtime=True))
    consumer = asyncio.create_task(read_all(source))
    await eventually(lambda: source.stats.read >= 2, "the first frames")
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    assert source.stats.last_error is None  # stopping early is not a truncated file
    # no_reader_threads_left checks that the reader thread is gone


@pytest.fixture
def bad_inputs(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """Inputs no source can read: the URI, and the SourceError message it must give."""
    empty = tmp_path / "empty.mp4"
    empty.touch()
    text = tmp_path / "notes.mp4"
    text.write_text("not a video at all\n")
    missing = tmp_path / "missing.mp4"
    (tmp_path / "pictures").mkdir()
    no_match = f"{tmp_path}/pictures/*.png"
    no_folder = f"{tmp_path}/absent/"
    return {
        "zero bytes": (str(empty), f"video file {empty}: the file is empty"),
        "text named .mp4": (str(text), f"video file {text}: not a video FFmpeg can read"),
        "missing file": (str(missing), f"video file {missing}: No such file or directory"),
        "glob matching nothing": (no_match, f"image folder {no_match}: no image files found"),
        "missing folder": (no_folder, f"image folder {no_folder}: No such file or directory"),
    }


@pytest.mark.parametrize(
    ("case", "decoder"),
    [
        *itertools.product(["zero bytes", "text named .mp4", "missing file"], ["opencv", "pyav"]),
        ("glob matching nothing", "auto"),
        ("missing folder", "auto"),
    ],
)
async def test_unusable_inputs_raise_source_error_naming_path_and_problem(
    bad_inputs: dict[str, tuple[str, str]], case: str, decoder: str
) -> None:
    uri, message = bad_inputs[case]
    source = open_source("bad", uri, SourceSettings.model_validate({"decoder": decoder}))
    with pytest.raises(SourceError, match=f"^{re.escape(message)}$"):
        await read_all(source)


@pytest.fixture
def truncated_clip(tmp_path: Path) -> Path:
    """The clip cut in half, its index (moov) moved to the front first, so that the first half stays playable."""
    whole = tmp_path / "whole.mp4"
    command = ["ffmpeg", "-v", "error", "-i", str(CLIP), "-c", "copy", "-movflags", "+faststart", str(whole)]
    subprocess.run(command, check=True)
    truncated = tmp_path / "truncated.mp4"
    content = whole.read_bytes()
    truncated.write_bytes(content[: len(content) // 2])
    return truncated


@pytest.mark.parametrize("decoder", ["opencv", "pyav"])
async def test_a_truncated_file_ends_cleanly(truncated_clip: Path, decoder: str) -> None:
    source = open_source("cut", str(truncated_clip), SourceSettings.model_validate({"decoder": decoder}))
    frames = await read_all(source)

    assert 0 < len(frames) == source.stats.read < 120
    ended = re.fullmatch(
        rf"video file {re.escape(str(truncated_clip))} ended after (\d+) of 120 frames", str(source.stats.last_error)
    )
    assert ended is not None, source.stats.last_error
    # OpenCV counts the frames it decoded; PyAV the frames the file holds, a last few of them cut short
    assert len(frames) <= int(ended[1]) <= len(frames) + (3 if decoder == "pyav" else 0)


def write_frames(folder: Path, count: int) -> None:
    for number in range(count):
        cv2.imwrite(str(folder / f"frame_{number:02d}.png"), np.full((6, 8, 3), number * 40, np.uint8))


async def test_image_folder_yields_images_in_name_order_and_skips_a_bad_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_frames(tmp_path, 5)
    bad = tmp_path / "frame_02_broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is no JPEG")
    (tmp_path / "notes.txt").write_text("not an image, and not named like one\n")

    source = open_source("folder", str(tmp_path), SourceSettings())
    assert source.total_frames == 6  # image files listed, the bad one included
    frames = await read_all(source)

    assert [int(frame.pixels[0, 0, 0]) for frame in frames] == [0, 40, 80, 120, 160]
    assert [frame.info.index for frame in frames] == list(range(5))
    assert all(frame.info.media_position_ms is None and frame.pixels.shape == (6, 8, 3) for frame in frames)
    assert [frame.info.file_name for frame in frames] == [str(tmp_path / f"frame_{n:02d}.png") for n in range(5)]
    assert source.stats.errors == source.stats.skipped == 1
    assert source.stats.last_error == f"{bad}: cannot decode image"
    assert str(bad) in caplog.text


async def test_image_glob_yields_what_it_matches(tmp_path: Path) -> None:
    write_frames(tmp_path, 3)
    shutil.copy(tmp_path / "frame_01.png", tmp_path / "thumbnail.png")

    frames = await read_all(open_source("glob", str(tmp_path / "frame_*.png"), SourceSettings()))

    assert [int(frame.pixels[0, 0, 0]) for frame in frames] == [0, 40, 80]


@pytest.mark.parametrize("decoder", ["opencv", "pyav"])
async def test_rtsp_camera_reconnects_after_the_camera_restarts(decoder: str) -> None:
    port = free_port()
    with rtsp_camera(CAMERA_CLIP, port) as camera:
        source = open_source("door", camera.url, CAMERA.model_copy(update={"decoder": decoder}))
        async with consuming(source) as frames:
            await eventually(lambda: len(frames) >= 5, "frames from the RTSP camera")
            camera.stop()
            await eventually(lambda: source.stats.reconnects >= 1, "the source to notice the camera went away")
            before_restart = len(frames)
            with rtsp_camera(CAMERA_CLIP, port):
                await eventually(lambda: len(frames) >= before_restart + 5, "frames after the camera restarted")

    assert source.policy is DeliveryPolicy.LIVE
    assert source.stats.last_error is not None
    indexes = [frame.info.index for frame in frames]
    assert indexes == sorted(set(indexes))
    assert all(frame.pixels.shape == (272, 640, 3) for frame in frames)
    # PyAV reads the stream's own timestamps (RTSP's first frame of a connection may have none);
    # OpenCV's camera frames have no media position
    timestamped = sum(frame.info.media_position_ms is not None for frame in frames)
    assert timestamped >= len(frames) - 2 if decoder == "pyav" else timestamped == 0


@pytest.mark.parametrize("decoder", ["opencv", "pyav"])
async def test_looping_rtsp_camera_plays_on_past_the_end_of_its_clip(decoder: str) -> None:
    """The README's test camera loops its clip: one connection reads on past the clip's end, time increasing."""
    clip, clip_frames, clip_ms = CLIPS / "bigbuckbunny.mp4", 132, 5280.0  # the shortest sample clip
    with rtsp_camera(clip, loop=True) as camera:
        source = open_source("loop", camera.url, CAMERA.model_copy(update={"decoder": decoder}))
        async with consuming(source) as frames:
            await eventually(lambda: source.stats.read >= clip_frames + 25, "a second of frames past the clip's end")

    assert source.stats.reconnects == 0, source.stats.last_error
    indexes = [frame.info.index for frame in frames]
    assert indexes == sorted(set(indexes))
    if decoder == "pyav":  # the stream's own timestamps go on increasing over the loop
        timed = [position for position in positions(frames) if position]
        assert timed == sorted(timed)
        assert timed[-1] > clip_ms


async def test_http_mjpeg_camera_keeps_only_the_newest_frame() -> None:
    with http_mjpeg_camera(CAMERA_CLIP) as camera:
        source = open_source("gate", camera.url, CAMERA)
        taken: list[Frame] = []
        read_when_asked: list[int] = []  # stats.read just before asking for each frame after the first
        async with aclosing(source.frames()) as frames:
            async for frame in frames:
                taken.append(frame)
                if len(taken) == 6:
                    break
                # A slow stage: hold on to this frame until the camera has sent three more.
                await eventually(lambda: source.stats.read >= taken[-1].info.index + 1 + 3, "three more frames")
                read_when_asked.append(source.stats.read)
        await source.close()

    indexes = [frame.info.index for frame in taken]
    assert indexes == sorted(set(indexes))
    # The reader hands frames over in index order and had handed over every frame up to `read - 2` by the time
    # stats.read said `read`: a frame taken after that is that one or newer, never one queued behind it.
    oldest_allowed = [read - 2 for read in read_when_asked]
    assert all(index >= oldest for index, oldest in zip(indexes[1:], oldest_allowed, strict=True)), (
        f"frames taken {indexes[1:]}, oldest each could be {oldest_allowed}"
    )
    # Each frame skipped was replaced before anyone took it, and counted as dropped; every frame read was taken or
    # dropped, but for at most two discarded on close (one waiting, one read as the source closed).
    skipped = indexes[-1] + 1 - len(taken)
    assert skipped <= source.stats.dropped
    assert 0 <= source.stats.read - source.stats.dropped - len(taken) <= 2


async def test_a_camera_that_never_answers_does_not_hold_up_other_sources(
    caplog: pytest.LogCaptureFixture, figures: dict[str, object]
) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # the kernel completes each TCP handshake; nothing ever answers
        url = f"rtsp://admin:secret@127.0.0.1:{silent.getsockname()[1]}/cam"
        # An open that waits a minute for an answer: the camera stays in its first open all through the replay.
        settings = SourceSettings(
            open_timeout_ms=60_000, read_timeout_ms=1000, stall_seconds=61, backoff_initial_seconds=0.05
        )
        camera = open_source("silent", url, settings)
        # Four passes of half a second, each opening the file again while the camera is stuck in its own open.
        replay = open_source("clip", str(CLIP), SourceSettings(realtime=True, loop=True, end_ms=500))
        async with consuming(camera) as camera_frames:
            try:
                await eventually(lambda: bool(select.select([silent], [], [], 0)[0]), "the camera to connect")
                arrivals = [time.monotonic()]
                try:
                    async with asyncio.timeout(WAIT_TIMEOUT), aclosing(replay.frames()) as frames:
                        async for _ in frames:
                            arrivals.append(time.monotonic())
                            if len(arrivals) == 1 + 60:
                                break
                except TimeoutError:
                    pytest.fail(f"the replay got {len(arrivals) - 1} of 60 frames in {WAIT_TIMEOUT:g} s")
                await replay.close()
                ended_meanwhile = (camera.stats.errors, camera.stats.reconnects)
            finally:
                silent.close()  # the pending connection is reset and new ones are refused: the opens now fail fast
            await eventually(lambda: camera.stats.errors >= 2, "two failed opens")

    assert ended_meanwhile == (0, 0)  # the replay's four opens all came and went during the camera's first
    assert camera_frames == []
    assert camera.stats.reconnects >= 2
    assert "secret" not in caplog.text
    assert "rtsp://***@127.0.0.1" in caplog.text
    figures["replay beside a camera stuck in its open: longest gap between frames, s (0.04 due)"] = max(
        later - earlier for earlier, later in itertools.pairwise(arrivals)
    )
