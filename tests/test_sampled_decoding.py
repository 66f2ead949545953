"""Sampled sources decode only what they keep (PyAV), and deliver the frames that decoding everything would keep."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from pipeline.frames import Frame
from pipeline.sampler import Sampler, SamplingSettings
from pipeline.sources import Source, SourceSettings, open_source
from services.errors import ConfigError
from tests.cameras import CLIPS, free_port, rtsp_camera
from tests.test_sources import CAMERA, consuming, eventually, positions, read_all

CAMERA_CLIP = CLIPS / "bikes.mp4"  # 640×272, 25 fps, keyframes at irregular intervals
MAX_PIXEL_DIFFERENCE = 2.0  # mean |Δ| between OpenCV's and PyAV's conversion of the same decoded frame to BGR


def make_clip(folder: Path, name: str, *encoder_args: str) -> Path:
    """4 s of FFmpeg's moving test pattern, 320×180 at 25 fps (100 frames), H.264 encoded with `encoder_args`."""
    clip = folder / name
    command = ["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=320x180:rate=25", "-t", "4"]
    command += ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", *encoder_args, str(clip)]
    subprocess.run(command, check=True, timeout=60)
    return clip


@pytest.fixture(scope="module")
def keyframe_every_second(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("clips")
    return make_clip(folder, "gop25.mp4", "-g", "25", "-keyint_min", "25", "-sc_threshold", "0", "-bf", "0")


@pytest.fixture(scope="module")
def with_b_frames(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A keyframe every 2 s and two B-frames between references: frames leave the decoder out of demux order."""
    folder = tmp_path_factory.mktemp("clips")
    return make_clip(folder, "gop50-b.mp4", "-preset", "medium", "-g", "50", "-sc_threshold", "0", "-bf", "2")


@pytest.fixture(scope="module")
def varying_frame_rate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 s: 50 frames at 25 fps, then 25 at 12.5 fps: no frame rate gives a frame's number from its time."""
    folder = tmp_path_factory.mktemp("clips")
    timing = ["-vf", "setpts='if(lt(N,50),N*0.04,2+(N-50)*0.08)/TB'", "-fps_mode", "vfr", "-g", "25"]
    return make_clip(folder, "vfr.mp4", *timing)


def packets(clip: Path) -> list[tuple[float, bool]]:
    """Each video packet's pts in seconds and whether it is a keyframe, by ffprobe (in decode order)."""
    command = ["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries", "packet=pts_time,flags"]
    command += ["-of", "csv=p=0", str(clip)]
    lines = subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()
    return [(float(pts), "K" in flags) for pts, flags in (line.split(",") for line in lines)]


def keyframe_positions(clip: Path) -> list[float]:
    """The keyframes' positions in ms."""
    return sorted(round(pts * 1000, 3) for pts, key in packets(clip) if key)


def keyframe_numbers(clip: Path) -> list[int]:
    """The keyframes' numbers in presentation order: how many frames are shown before each."""
    times = [pts for pts, _ in packets(clip)]
    return sorted(sum(other < pts for other in times) for pts, key in packets(clip) if key)


def sampled(source_settings: SourceSettings, **sampling: object) -> tuple[SourceSettings, SamplingSettings]:
    return source_settings, SamplingSettings.model_validate(sampling)


async def read(clip: Path, settings: SourceSettings, sampling: SamplingSettings) -> tuple[Source, list[Frame]]:
    source = open_source("clip", str(clip), settings, sampling)
    return source, await read_all(source)


async def kept_by_decoding_everything(clip: Path, sampling: SamplingSettings) -> list[Frame]:
    """What the OpenCV path delivers after the sampler: every frame decoded, the sampler keeps some."""
    _, frames = await read(clip, SourceSettings(decoder="opencv"), SamplingSettings())
    sampler = Sampler(sampling)
    return [frame for frame in frames if sampler.keep(frame.info)]


def assert_same_pictures(ours: list[Frame], reference: list[Frame]) -> None:
    assert positions(ours) == pytest.approx(positions(reference), abs=0.01)
    for frame, expected in zip(ours, reference, strict=True):
        difference = np.abs(frame.pixels.astype(np.int16) - expected.pixels.astype(np.int16)).mean()
        assert difference < MAX_PIXEL_DIFFERENCE, frame.info


async def test_fps_at_the_keyframe_rate_decodes_one_frame_per_sample(keyframe_every_second: Path) -> None:
    source, frames = await read(keyframe_every_second, SourceSettings(), SamplingSettings(fps=1))

    assert positions(frames) == [0.0, 1000.0, 2000.0, 3000.0]
    assert [frame.info.index for frame in frames] == [0, 25, 50, 75]  # numbers in the stream, skipped ones counted
    assert source.stats.read == source.stats.decoded == 4  # of 100 frames
    assert source.stats.last_error is None  # the frames not decoded do not make the file look truncated


@pytest.mark.parametrize("fps", [3.0, 1.0, 0.4])
async def test_fps_delivers_the_frames_decoding_everything_would_keep(with_b_frames: Path, fps: float) -> None:
    source, frames = await read(with_b_frames, SourceSettings(), SamplingSettings(fps=fps))
    reference = await kept_by_decoding_everything(with_b_frames, SamplingSettings(fps=fps))

    assert_same_pictures(frames, reference)
    assert source.stats.decoded < 100 * 2 / 3  # B-frames before a sample time are never decoded
    downstream = Sampler(SamplingSettings(fps=fps))
    assert all(downstream.keep(frame.info) for frame in frames)  # the sampling stage keeps what the source kept


@pytest.mark.parametrize("fps", [None, 0.4])
async def test_keyframes_delivers_each_keyframe(
    with_b_frames: Path, keyframe_every_second: Path, fps: float | None
) -> None:
    for clip in (with_b_frames, keyframe_every_second):
        source, frames = await read(clip, SourceSettings(), SamplingSettings(keyframes=True, fps=fps))
        expected = keyframe_positions(clip)
        if fps is not None:  # at most one keyframe per 2.5 s
            expected = [position for position in expected if position % 2500 < 1000]
        assert positions(frames) == expected, clip.name
        assert source.stats.decoded == len(expected)


async def test_every_nth_keeps_the_same_frames_numbered_in_presentation_order(with_b_frames: Path) -> None:
    _source, frames = await read(with_b_frames, SourceSettings(decoder="pyav"), SamplingSettings(every_nth=7))
    reference = await kept_by_decoding_everything(with_b_frames, SamplingSettings(every_nth=7))

    assert [frame.info.index for frame in frames] == list(range(0, 100, 7))
    assert_same_pictures(frames, reference)


async def test_pyav_replays_offsets_and_loops_like_opencv(keyframe_every_second: Path) -> None:
    offsets = SourceSettings(start_ms=1500, end_ms=2500)
    ours = await read(keyframe_every_second, offsets.model_copy(update={"decoder": "pyav"}), SamplingSettings())
    theirs = await read(keyframe_every_second, offsets.model_copy(update={"decoder": "opencv"}), SamplingSettings())
    assert_same_pictures(ours[1], theirs[1])
    assert positions(ours[1])[0] == 1520.0
    assert len(ours[1]) == 25
    # from the keyframe at 1000 ms, seeked to, up to the frame at end_ms that shows the range is over
    assert ours[0].stats.decoded == 13 + 25 + 1

    looped = SourceSettings(decoder="pyav", loop=True, end_ms=1000)
    source = open_source("clip", str(keyframe_every_second), looped, SamplingSettings(fps=2))
    async with consuming(source) as frames:
        await eventually(lambda: len(frames) >= 6, "three passes of the loop")
    assert positions(frames)[:6] == [0.0, 520.0] * 3
    indexes = [frame.info.index for frame in frames]
    assert indexes == sorted(set(indexes))  # numbers keep growing across passes


@pytest.mark.parametrize("decoder", ["pyav", "opencv"])
@pytest.mark.parametrize(
    "sampling",
    [SamplingSettings(), SamplingSettings(every_nth=5), SamplingSettings(fps=5)],
    ids=["every frame", "every_nth", "fps"],
)
async def test_a_replay_from_start_ms_numbers_its_frames_as_a_whole_replay_does(
    varying_frame_rate: Path, decoder: str, sampling: SamplingSettings
) -> None:
    """A replay resumed with start_ms publishes the frames of the whole replay's tail, with the same numbers."""
    for clip, start_ms in ((CAMERA_CLIP, 4800.0), (varying_frame_rate, 2400.0)):
        settings = SourceSettings(decoder=decoder)
        _, whole = await read(clip, settings, sampling)
        _, resumed = await read(clip, settings.model_copy(update={"start_ms": start_ms}), sampling)
        tail = [frame for frame in whole if (frame.info.media_position_ms or 0.0) >= start_ms]
        assert tail, clip.name
        assert numbered(resumed) == numbered(tail), clip.name


def numbered(frames: list[Frame]) -> list[tuple[int, float]]:
    return [(frame.info.index, round(frame.info.media_position_ms or 0.0, 3)) for frame in frames]


def test_settings_the_decoder_cannot_apply_are_refused() -> None:
    with pytest.raises(ConfigError, match="keyframes"):
        open_source("clip", "clip.mp4", SourceSettings(decoder="opencv"), SamplingSettings(keyframes=True))
    with pytest.raises(ConfigError, match="local device"):
        open_source("cam", "/dev/video0", SourceSettings(), SamplingSettings(keyframes=True))
    with pytest.raises(ValueError, match="every_nth"):
        SamplingSettings(keyframes=True, every_nth=2)


async def test_rtsp_cameras_deliver_keyframes_each_over_its_own_transport() -> None:
    expected = keyframe_positions(CAMERA_CLIP)[:3]
    with rtsp_camera(CAMERA_CLIP) as camera:
        cameras = [
            open_source(name, camera.url, CAMERA.model_copy(update={"rtsp_transport": transport}), sampling)
            for name, transport in (("tcp", "tcp"), ("udp", "udp"))
            for sampling in [SamplingSettings(keyframes=True)]
        ]
        async with consuming(cameras[0]) as over_tcp, consuming(cameras[1]) as over_udp:
            await eventually(lambda: len(over_tcp) >= 3 and len(over_udp) >= 3, "three keyframes from each camera")

    for source, frames in zip(cameras, (over_tcp, over_udp), strict=True):
        assert [frame.info.index for frame in frames[:3]] == keyframe_numbers(CAMERA_CLIP)[:3], source.source_id
        # the stream's clock: keyframes as far apart as in the file (RTP may shift the first one, here by 160 ms)
        assert positions(frames)[2] - positions(frames)[1] == pytest.approx(expected[2] - expected[1], abs=1.0)
        assert source.stats.decoded == len(frames) + source.stats.dropped
        assert all(frame.pixels.shape == (272, 640, 3) for frame in frames)


async def test_a_camera_that_refuses_is_reported_without_its_credentials(caplog: pytest.LogCaptureFixture) -> None:
    url = f"rtsp://viewer:s3cret@127.0.0.1:{free_port()}/cam"  # nothing listens there
    source = open_source("door", url, CAMERA, SamplingSettings(fps=1))
    async with consuming(source):
        await eventually(lambda: source.stats.reconnects >= 2, "two failed connections")

    assert source.stats.last_error == "could not open it: Connection refused"
    assert "s3cret" not in caplog.text
    assert "rtsp://***@127.0.0.1" in caplog.text
