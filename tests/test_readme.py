"""The README's quickstarts run as written, the example configs with local addresses run, and every other
`framelabel` command the README shows is accepted by the CLI's parser and names files that exist.

Each quickstart block in README.md follows an HTML comment `<!-- quickstart: NAME -->`.
A shell block is run line by line from the checkout, as a user would after
`source .venv/bin/activate` (this test's own venv comes first on PATH): a line ending
in `&` starts in the background and is stopped by the test, any other line must exit 0
(a trailing `# comment` is left out).
Only the fixed ports (8554 camera, 9092 broker, 9100 live view) are replaced by free ones,
so that tests can run side by side; a config the README names is copied with the same
replacement. Everything else is exactly the README's text.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pipeline.cli import main
from pipeline.config import RunConfig
from pipeline.processes import stop_process
from tests.cameras import CLIPS, free_port, listening, wait_until
from tests.helpers import parsed_by_the_cli

CHECKOUT = Path(__file__).resolve().parents[1]
README = CHECKOUT / "README.md"
QUICKSTART = re.compile(r"<!-- quickstart: (?P<name>[\w-]+) -->\n```(?P<language>\w+)\n(?P<body>.*?)```", re.DOTALL)
FIXED_PORTS = ("8554", "9092", "9100")
TRAILING_COMMENT = re.compile(r"(^|\s+)#.*")
SH_BLOCK = re.compile(r"^```sh\n(?P<body>.*?)^```", re.DOTALL | re.MULTILINE)
SERVED_PORT = re.compile(r"(?<![\w-])--port (\d+)")  # what a background line listens on
COMMAND_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
PEOPLE_AND_VEHICLES = {"person", "bicycle", "car", "bus", "truck", "motorcycle"}


def quickstarts() -> dict[str, tuple[str, str]]:
    """NAME → (language, text) of every marked block."""
    return {m["name"]: (m["language"], m["body"]) for m in QUICKSTART.finditer(README.read_text())}


@dataclass
class Session:
    """A user's shell in the checkout: the README's ports swapped for free ones, background jobs kept to stop."""

    workdir: Path
    ports: dict[str, str] = field(default_factory=lambda: {port: str(free_port()) for port in FIXED_PORTS})
    jobs: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        return os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    def localised(self, text: str) -> str:
        """`text` with the free ports; a config it names is copied with them too."""
        for config in set(re.findall(r"configs/[\w.-]+\.yaml", text)):
            copy = self.workdir / Path(config).name
            copy.write_text(self.with_free_ports((CHECKOUT / config).read_text()))
            text = text.replace(config, str(copy))
        return self.with_free_ports(text)

    def with_free_ports(self, text: str) -> str:
        for fixed, free in self.ports.items():
            text = re.sub(rf"\b{fixed}\b", free, text)
        return text

    def start(self, line: str) -> subprocess.Popen[bytes]:
        command = self.localised(line.removesuffix("&").strip())
        log = (self.workdir / f"job-{len(self.jobs)}.log").open("wb")
        process = subprocess.Popen(
            ["bash", "-c", f"exec {command}"], cwd=CHECKOUT, env=self.env(), stdout=log, stderr=subprocess.STDOUT
        )
        self.jobs.append((command, process))
        if port := SERVED_PORT.search(command):
            wait_until(lambda: listening(int(port[1])) or process.poll() is not None, f"`{command}` to listen")
            assert process.poll() is None, f"`{command}` ended:\n{self.log(process)}"
        return process

    def run(self, line: str) -> str:
        command = self.localised(line)
        result = subprocess.run(
            ["bash", "-c", command], cwd=CHECKOUT, env=self.env(), capture_output=True, timeout=COMMAND_TIMEOUT_S
        )
        assert result.returncode == 0, f"`{command}` exited {result.returncode}:\n{result.stderr.decode()}"
        return result.stdout.decode() + result.stderr.decode()

    def log(self, process: subprocess.Popen[bytes]) -> str:
        return (self.workdir / f"job-{[p for _, p in self.jobs].index(process)}.log").read_text(errors="replace")

    def stop(self, process: subprocess.Popen[bytes]) -> int:
        stop_process(process, STOP_TIMEOUT_S)
        return process.returncode

    def stop_all(self) -> None:
        for _, process in reversed(self.jobs):  # the last started (a run) before what it uses
            self.stop(process)


@contextmanager
def session() -> Iterator[Session]:
    with tempfile.TemporaryDirectory() as workdir, ExitStack() as cleanup:
        shell = Session(Path(workdir))
        cleanup.callback(shell.stop_all)
        yield shell


def shell_lines(name: str) -> list[str]:
    language, body = quickstarts()[name]
    assert language == "sh"
    lines = (TRAILING_COMMENT.sub("", line) for line in body.splitlines())
    return [line for line in lines if line.strip()]


def json_lines(output: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def test_the_readme_marks_its_quickstarts() -> None:
    assert set(quickstarts()) == {"camera", "replay", "python", "events"}


def test_quickstart_live_camera_to_kafka_to_a_consumer() -> None:
    """Camera, broker and run in the background; the consumer gets labelled records; the live view answers."""
    camera_line, broker_line, run_line, consume_line, view_line = shell_lines("camera")
    with session() as shell:
        shell.start(camera_line)
        shell.start(broker_line)
        run = shell.start(run_line)
        records = json_lines(shell.run(consume_line))
        assert len(records) == 3
        assert {record["source_id"] for record in records} == {"gate"}
        labels = {a["label"]["name"] for r in records for a in r["response"]["annotations"]}  # type: ignore[index]
        assert labels & PEOPLE_AND_VEHICLES, labels
        sources = json.loads(shell.run(view_line))
        assert [(s["id"], s["kind"]) for s in sources] == [("gate", "live")]
        assert sources[0]["published"] >= 3
        assert shell.stop(run) == 0, shell.log(run)  # stopped by a signal, nothing lost
        assert "gate" in shell.log(run)  # the summary


def test_quickstart_replay_and_resume_then_read_in_python(tmp_path: Path) -> None:
    """The replay publishes every sampled frame; its resume point resumes; the Python example reads them."""
    broker_line, run_line, consume_line, resume_line = shell_lines("replay")
    with session() as shell:
        shell.start(broker_line)
        summary = shell.run(run_line)
        assert "frame 245 @ 9800.000 ms" in summary  # the resume point the README quotes
        records = json_lines(shell.run(consume_line))
        assert [(r["source_id"], r["frame_index"]) for r in records] == [("bikes", i) for i in range(0, 25, 5)]
        assert "@ 9800.000 ms" in shell.run(resume_line)
        # the resumed replay's records are the first run's from 4800 ms on, with the same frame numbers
        everything = json_lines(shell.run(consume_line.replace(" --max 5", "")))
        numbered = [(r["frame_index"], r["media_position_ms"]) for r in everything]
        assert len(numbered) == 50 + 26
        assert numbered[50:] == [(index, ms) for index, ms in numbered[:50] if float(ms) >= 4800]

        language, program = quickstarts()["python"]
        assert language == "python"
        script = tmp_path / "reader.py"
        script.write_text(shell.with_free_ports(program))
        printed = shell.run(f"python {script}").splitlines()
        assert printed, "the Python example printed nothing"
        assert all(re.fullmatch(r"bikes frame \d+: \S.*", line) for line in printed), printed
        # 50 frames, then 26 from 4800 ms on; a frame with no label at 0.2 or more is left out
        assert 0 < len(printed) <= 76


def test_quickstart_events_of_a_replay_paced_like_a_camera() -> None:
    """`framelabel events` turns what the run publishes into events; the consumer prints the first two."""
    broker_line, events_line, run_line, consume_line = shell_lines("events")
    with session() as shell:
        shell.start(broker_line)
        events = shell.start(events_line)
        shell.run(run_line)
        messages = json_lines(shell.run(consume_line))
        assert len(messages) == 2
        assert messages[0]["state"] == "START"
        assert {(m["source_id"], m["classifier"]) for m in messages} == {("bikes", "objects")}
        assert {m["label"] for m in messages} <= PEOPLE_AND_VEHICLES, messages
        assert shell.stop(events) == 0, shell.log(events)


def test_the_rtsp_camera_config_runs_against_a_local_camera_and_broker() -> None:
    """configs/rtsp-camera.yaml, as shipped (ports aside): a camera and a broker where it looks for them."""
    with session() as shell:
        shell.start("/usr/bin/python3 tools/rtsp_camera.py --port 8554 " + str(CLIPS / "bikes.mp4"))
        shell.start("framelabel broker --port 9092")
        run = shell.start("framelabel run configs/rtsp-camera.yaml")
        records = json_lines(
            shell.run(
                "framelabel consume --bootstrap 127.0.0.1:9092 --topic cameras.moderation --from-beginning --max 2"
            )
        )
        assert [r["source_id"] for r in records] == ["gate", "gate"]
        assert shell.stop(run) == 0, shell.log(run)


def readme_commands() -> list[tuple[str, list[str]]]:
    """Every `framelabel …` command of the README's sh blocks, as (its line, argv): continuations joined, the
    comment and a trailing `&` left out. The synopsis lines, with their optional parts in [brackets], are not
    commands."""
    commands = []
    for block in SH_BLOCK.finditer(README.read_text()):
        for line in re.sub(r"\\\n\s*", " ", block["body"]).splitlines():
            argv = shlex.split(line, comments=True)
            if argv[:1] == ["framelabel"] and not any(arg.startswith("[") for arg in argv):
                commands.append((TRAILING_COMMENT.sub("", line).strip(), argv[1:-1] if argv[-1] == "&" else argv[1:]))
    return commands


def checkout_paths(argv: list[str]) -> list[str]:
    """The files of the checkout that `argv` names (as an argument or after `=`), globs included; absolute paths
    are the container's (tests/test_stack.py checks what is mounted there)."""
    paths = [Path(arg.rpartition("=")[2]) for arg in argv]
    return [str(p) for p in paths if len(p.parts) > 1 and not p.is_absolute() and (CHECKOUT / p.parts[0]).is_dir()]


def test_the_readme_shows_commands_of_every_kind() -> None:
    """The extraction below finds the README's examples: each subcommand shown at least once."""
    shown = {argv[0] for _, argv in readme_commands()}
    assert shown >= {"run", "consume", "events", "broker", "sources", "serve", "health"}


@pytest.mark.parametrize(("line", "argv"), readme_commands(), ids=[line for line, _ in readme_commands()])
def test_every_readme_command_is_accepted_and_names_files_that_exist(line: str, argv: list[str]) -> None:
    parsed_by_the_cli(argv, "README.md")
    for path in checkout_paths(argv):
        assert list(CHECKOUT.glob(path)), f"`{line}` names {path}, which is not in the checkout"


def test_framelabel_run_with_no_arguments_replays_the_sample_clip() -> None:
    """The README's first `run` example, as a new user types it: the sample clip, imagenet, an embedded broker."""
    [line] = [line for line, argv in readme_commands() if argv == ["run"]]
    with session() as shell:
        output = shell.run(line)
    assert "embedded Kafka broker" in output
    assert "bigbuckbunny (replay) → in-process classifier imagenet" in output
    assert "frame 131 @ 5240.000 ms" in output  # the clip's last frame published


def started_here(argv: list[str]) -> bool:
    """A `run` or `serve` command whose files are this checkout's (absolute paths are a container's)."""
    return argv[0] in {"run", "serve"} and not any(Path(arg).is_absolute() for arg in argv)


@pytest.mark.parametrize(
    ("line", "argv"),
    [command for command in readme_commands() if started_here(command[1])],
    ids=[line for line, argv in readme_commands() if started_here(argv)],
)
def test_every_readme_run_and_serve_command_starts_with_what_it_says(
    line: str, argv: list[str], started_configs: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beyond the parser: the CLI builds the config it would start with (the run or the service returns at once),
    with the sources, topic and annotator the command names."""
    monkeypatch.chdir(CHECKOUT)
    monkeypatch.setenv("FRAMELABEL_API_KEYS", "readme-key")  # as the README says for `serve --host 0.0.0.0`
    assert main(argv) == 0, line
    args = parsed_by_the_cli(argv, "README.md")
    if argv[0] == "serve":
        assert started_configs["serve"].host == (args.host or "127.0.0.1")
        return
    run: RunConfig = started_configs["run"]
    assert {source.id for source in run.sources} >= {source.partition("=")[0] for source in args.source or []}
    assert run.kafka.topic == (args.topic or run.kafka.topic)
    assert run.annotator.classifier == (args.classifier or run.annotator.classifier)
    assert run.annotator.targets == tuple(args.target or run.annotator.targets)


def test_the_test_camera_without_its_default_clip_says_what_to_do(tmp_path: Path) -> None:
    """In a checkout without .venv (no `make demo` yet) the camera's default clip is missing: it says so."""
    (tmp_path / "tools").mkdir()
    camera = shutil.copy(CHECKOUT / "tools" / "rtsp_camera.py", tmp_path / "tools")
    result = subprocess.run(["/usr/bin/python3", camera, "--port", "0"], capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "bikes.mp4: run `make demo` first" in result.stderr, result.stderr


@pytest.mark.parametrize("config", ["replay.yaml", "rtsp-camera.yaml"])
def test_the_configs_run_here_have_local_addresses_only(config: str) -> None:
    """The configs run above are the ones whose every address is on this host; the others are only loaded
    (tests/test_stack.py loads every file in configs/)."""
    addresses = re.findall(r"(?:rtsp://|bootstrap_servers: )([\w.-]+)", (CHECKOUT / "configs" / config).read_text())
    assert set(addresses) == {"127.0.0.1"}
