"""`framelabel annotate` and `framelabel serve` run the way a user runs them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.helpers import FRAMELABEL, ServiceProcess, jpeg, photo


def framelabel(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FRAMELABEL, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for name in ("coffee", "chelsea"):
        path = folder / f"{name}.jpg"
        path.write_bytes(jpeg(photo(name)))
        paths.append(path)
    return paths


def test_annotate_in_process_prints_one_json_line_per_image_naming_it(photos: list[Path]) -> None:
    result = framelabel("annotate", "--classifier", "moderation", *map(str, photos))
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["file"] for line in lines] == [str(photo) for photo in photos]
    for response in (line["response"] for line in lines):
        assert set(response) == {"request_id", "classifier_specification", "annotations"}
        assert response["classifier_specification"]["classification_type"] == "MULTI_CLASS"
        assert response["annotations"][0]["label"]["name"] == "sfw"


def test_annotate_through_the_service(imagenet_service: ServiceProcess, photos: list[Path]) -> None:
    result = framelabel("annotate", "--target", imagenet_service.address, "--top", "1", str(photos[0]))
    assert result.returncode == 0, result.stderr
    response = json.loads(result.stdout)["response"]
    assert [a["label"]["name"] for a in response["annotations"]] == ["espresso"]
    assert "labels" not in response["classifier_specification"]


def test_annotate_reports_bad_images_and_goes_on(photos: list[Path], tmp_path: Path) -> None:
    text = tmp_path / "notes.jpg"
    text.write_text("not a photo")
    result = framelabel(
        "annotate", "--classifier", "moderation", str(text), str(tmp_path / "missing.jpg"), str(photos[0])
    )
    assert result.returncode == 1
    assert f"{text}: INVALID_ARGUMENT: cannot decode image" in result.stderr
    assert "missing.jpg: No such file or directory" in result.stderr
    assert [json.loads(line)["file"] for line in result.stdout.splitlines()] == [str(photos[0])]  # still annotated


def test_annotate_against_an_unreachable_target_names_it(photos: list[Path]) -> None:
    result = framelabel("annotate", "--target", "127.0.0.1:1", "--retry-for", "1", str(photos[0]))
    assert result.returncode == 2
    assert "framelabel: error: cannot reach the Annotate service at 127.0.0.1:1 within 1 s" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("port: seventy\n", "port: Input should be a valid integer"),
        ("max_concurrent_requests: 0\n", "max_concurrent_requests: Input should be greater than 0"),
        ("colour: red\n", "colour: Extra inputs are not permitted"),
        ("port: [\n", "not valid YAML"),
        ("classifier: resnet\n", "unknown classifier 'resnet'"),
    ],
)
def test_serve_with_a_bad_config_ends_with_one_clear_line(tmp_path: Path, config: str, message: str) -> None:
    path = tmp_path / "service.yaml"
    path.write_text(config)
    result = framelabel("serve", "--config", str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("framelabel: error: ")
    assert message in lines[0]


def test_serve_with_a_missing_config_names_the_file(tmp_path: Path) -> None:
    result = framelabel("serve", "--config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert f"cannot read config {tmp_path / 'nope.yaml'}: No such file or directory" in result.stderr
