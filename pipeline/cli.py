"""The `framelabel` command."""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
from google.protobuf import json_format
from rich.console import Console

from pipeline.annotators import Annotator
from pipeline.cluster.settings import SOURCES_PARTITIONS, SOURCES_TOPIC, STATUS_TOPIC
from pipeline.config import AnnotatorConfig, load_kafka_settings, load_run_config, load_sources
from pipeline.job import build_annotator
from pipeline.kafka import DEFAULT_TOPIC, EMBEDDED, KafkaConnection
from services.api.image_classifier_pb2 import AnnotationRequest, AnnotationResponse
from services.api.image_pb2 import Image
from services.classifier import load_classifier
from services.config import load_service_config, validate
from services.errors import ConfigError, FramelabelError, InvalidImageError
from services.imaging import ImageLimits, sniff_format

log = logging.getLogger("framelabel")

LIBRARY_REPEAT_SECONDS = 10.0
OPENCV_FFMPEG_LOG_LEVEL = "OPENCV_FFMPEG_LOGLEVEL"  # read once, at OpenCV's first FFmpeg open
DEFAULT_CONSUME_BOOTSTRAP = "127.0.0.1:9092"


def response_dict(response: AnnotationResponse) -> dict[str, object]:
    """The protobuf JSON mapping with the API reference's field names (`request_id`, …)."""
    return json_format.MessageToDict(response, preserving_proto_field_name=True)


class _LibraryRepeats(logging.Filter):
    """Let each message of a chatty library through once per `seconds`: aiokafka logs every retry,
    ten lines a second while a broker is unreachable; framelabel says what the outage costs."""

    def __init__(self, prefix: str, seconds: float) -> None:
        super().__init__()
        self._prefix, self._seconds = prefix, seconds
        self._last: dict[tuple[str, object], float] = {}  # bounded: one entry per message template

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self._prefix):
            return True
        key, now = (record.name, record.msg), time.monotonic()
        if now - self._last.get(key, -self._seconds) < self._seconds:
            return False
        self._last[key] = now
        return True


def _not_reported_by_us(record: logging.LogRecord) -> bool:
    """aiokafka's own line about a refused idempotent producer: the publisher says what it means and does."""
    return not (record.name.startswith("aiokafka") and "InitProducerIdRequest" in str(record.msg))


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if level != "debug":
        logging.getLogger("aiokafka").setLevel(logging.WARNING)  # its INFO lines are its own bookkeeping
        for handler in logging.getLogger().handlers:
            handler.addFilter(_LibraryRepeats("aiokafka", LIBRARY_REPEAT_SECONDS))
            handler.addFilter(_not_reported_by_us)
        # OpenCV warns at every FFmpeg open that its lock is off, which we do on purpose (sources/_ffmpeg.py)
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    # FFmpeg's own lines ("[tcp @ 0x…] Connection to … failed") repeat, in its words, what framelabel says
    # of each reconnect: OpenCV's FFmpeg stays quiet (panics only) unless debugging. PyAV's FFmpeg logs
    # nothing by default, and stays so: PyAV warns that its log forwarding can deadlock reader threads.
    if level != "debug":
        os.environ.setdefault(OPENCV_FFMPEG_LOG_LEVEL, "0")


def _serve(args: argparse.Namespace) -> int:
    from services.server import serve

    config = load_service_config(
        args.config,
        {
            "classifier": args.classifier,
            "host": args.host,
            "port": args.port,
            "classifiers_file": args.classifiers,
            "metrics_port": args.metrics_port,
            "metrics_host": args.metrics_host,
        },
    )
    overrides = {"top_k": args.top_k} if args.top_k else None
    limits = ImageLimits(config.max_image_bytes, config.max_pixels)
    asyncio.run(
        serve(config, functools.partial(load_classifier, config.classifier, config.classifiers_file, limits, overrides))
    )
    return 0


def _health(args: argparse.Namespace) -> int:
    from pipeline.health import check_serving

    serving, status = check_serving(args.target, args.timeout)
    print(f"{args.target}: {status}")
    return 0 if serving else 1


def _annotator_for(args: argparse.Namespace) -> Annotator:
    if args.target:
        flags: dict[str, object] = {
            "kind": "grpc",
            "targets": args.target,
            "tls": args.tls,
            "ca_file": args.ca_file,
            "retry_for_seconds": args.retry_for,
            "connect_timeout_seconds": args.retry_for,
        }
    else:  # uncapped, as the API answers: --top trims what is printed
        flags = {
            "classifier": args.classifier,
            "classifiers_file": args.classifiers,
            "top_k": None,
            "specification_labels": "all",
        }
    return build_annotator(validate(AnnotatorConfig, flags, "annotate flags"))


async def _annotate_files(args: argparse.Namespace) -> int:
    failures = 0
    async with _annotator_for(args) as annotator:
        for path in args.images:
            try:
                content = path.read_bytes()
            except OSError as exc:
                print(f"framelabel: {path}: {exc.strerror}", file=sys.stderr)
                failures += 1
                continue
            image_format = sniff_format(content)
            image_type = image_format.value if image_format else Image.IMAGE_TYPE_UNSPECIFIED
            request = AnnotationRequest(image=Image(content=content, image_type=image_type))
            try:
                response = await annotator.annotate(request)
            except InvalidImageError as exc:
                print(f"framelabel: {path}: INVALID_ARGUMENT: {exc}", file=sys.stderr)
                failures += 1
                continue
            if args.top is not None:
                del response.annotations[args.top :]
                del response.classifier_specification.labels[:]
            print(json.dumps({"file": str(path), "response": response_dict(response)}, ensure_ascii=False), flush=True)
    return 1 if failures else 0


def _run(args: argparse.Namespace) -> int:
    from pipeline.job import run_job

    flags = _source_flags(args) | {
        "classifier": args.classifier,
        "targets": args.target,
        "tls": args.tls,
        "bootstrap": args.bootstrap,
        "topic": args.topic,
        "no_idempotence": args.no_idempotence,
        "metrics_port": args.metrics_port,
        "metrics_host": args.metrics_host,
        "group": args.group,
    }
    config = load_run_config(args.config, flags)
    return asyncio.run(run_job(config, _stdout_console()))


def _source_flags(args: argparse.Namespace) -> dict[str, object]:
    """`--source` and the per-source settings (SOURCE_FLAGS) as `load_run_config` and `load_sources` take them."""
    return {
        "sources": args.source,
        "fps": args.fps,
        "every_nth": args.every_nth,
        "realtime": args.realtime or None,
        "loop": args.loop or None,
        "start_ms": args.start_ms,
    }


def _stdout_console() -> Console:
    """Tables at the terminal's width; wide ones when stdout is a pipe or a file."""
    return Console() if sys.stdout.isatty() else Console(width=160)


def _bootstrap(args: argparse.Namespace) -> str | None:
    """`--bootstrap`; else the `--config`'s address; without a config, the address of `framelabel broker`."""
    return args.bootstrap or (None if args.config else DEFAULT_CONSUME_BOOTSTRAP)


def _cluster_connection(args: argparse.Namespace) -> KafkaConnection:
    """The cluster the catalog and status topics live on: `--config`'s `kafka:` section, `--bootstrap` on top."""
    flags = {"bootstrap": _bootstrap(args)}
    connection = load_kafka_settings(args.config, flags)
    if connection.bootstrap_servers == EMBEDDED:
        raise ConfigError("the sources and status topics need a Kafka address (--bootstrap), not a run's embedded one")
    return connection


def _sources_add(args: argparse.Namespace) -> int:
    from pipeline.cluster import command

    sources = load_sources(args.file, _source_flags(args))
    print(asyncio.run(command.add(_cluster_connection(args), args.topic, args.partitions, sources)))
    return 0


def _sources_remove(args: argparse.Namespace) -> int:
    from pipeline.cluster import command

    print(asyncio.run(command.remove(_cluster_connection(args), args.topic, args.ids)))
    return 0


def _sources_list(args: argparse.Namespace) -> int:
    from pipeline.cluster import command
    from pipeline.cluster.catalog import read_sources

    catalog = asyncio.run(read_sources(_cluster_connection(args), args.topic))
    if args.json:
        for line in command.catalog_lines(catalog):
            print(line, flush=True)
    else:
        console = _stdout_console()
        console.print(command.catalog_view(catalog, args.topic, console.width))
    return 0


def _status(args: argparse.Namespace) -> int:
    from pipeline.cluster import command

    workers, catalog = asyncio.run(
        command.read_cluster(_cluster_connection(args), args.status_topic, args.sources_topic, args.group)
    )
    if args.json:
        print(command.status_json(workers, catalog), flush=True)
    else:
        console = _stdout_console()
        console.print(command.status_view(workers, catalog, console.width))
    return 0


async def _consume(args: argparse.Namespace) -> int:
    from pipeline.consumer import consume
    from pipeline.events.record import event_json
    from pipeline.records import DecodedRecord, record_json

    flags = {"bootstrap": _bootstrap(args), "topic": args.topic}
    items = consume(
        load_kafka_settings(args.config, flags),
        from_beginning=args.from_beginning,
        max_records=args.max,
        source_id=args.source,
        idle_timeout_s=args.idle_timeout,
        group_id=args.group,
        min_confidence=args.min_confidence,
    )
    async for item in items:
        printed = record_json(item) if isinstance(item, DecodedRecord) else event_json(item)
        print(json.dumps(printed, ensure_ascii=False), flush=True)
    return 0


def _bounded(kind: type[float] | type[int], low: float, high: float | None, what: str) -> Callable[[str], float]:
    """An argparse type that refuses values outside [low, high] (high None: no upper bound), naming the range."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if value < low or (high is not None and value > high):
            bound = f"between {low:g} and {high:g}" if high is not None else f"at least {low:g}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: {what} {bound}")
        return value

    return parse


def _events(args: argparse.Namespace) -> int:
    from pipeline.events.command import load_events_config, run_events

    flags = {
        "bootstrap": _bootstrap(args),
        "input_topic": args.input_topic,
        "topic": args.topic,
        "group": args.group,
        "delivery": args.delivery,
    }
    return asyncio.run(run_events(*load_events_config(args.config, flags)))


def _broker(args: argparse.Namespace) -> int:
    from pipeline.broker import run_broker

    run_broker(args.port)
    return 0


def _add_metrics_flags(command: argparse.ArgumentParser, what: str) -> None:
    command.add_argument("--metrics-port", type=int, metavar="PORT", help=f"serve {what} on this HTTP port")
    command.add_argument(
        "--metrics-host",
        metavar="HOST",
        help="address of the metrics port (default: 127.0.0.1; elsewhere the page needs FRAMELABEL_HTTP_TOKEN)",
    )


def _add_per_source_flags(command: argparse.ArgumentParser) -> None:
    """The settings SOURCE_FLAGS names, each set on every source the command is given."""
    sampling = command.add_mutually_exclusive_group()
    sampling.add_argument("--fps", type=float, help="annotate at most this many frames a second, for every source")
    sampling.add_argument("--every-nth", type=int, metavar="N", help="annotate every Nth frame, for every source")
    command.add_argument("--realtime", action="store_true", help="files: play at their own speed, as a camera would")
    command.add_argument("--loop", action="store_true", help="files: start again at the end, until stopped")
    command.add_argument(
        "--start-ms",
        type=_bounded(float, 0, None, "a media position"),
        metavar="MS",
        help="files: start at this media position (the summary's `last_published`, to resume a replay)",
    )


def _add_cluster_flags(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--config", type=Path, help="connect with the `kafka:` section of this run YAML (address, TLS, SASL)"
    )
    command.add_argument(
        "--bootstrap", help=f"Kafka bootstrap servers (default: the config's, or {DEFAULT_CONSUME_BOOTSTRAP})"
    )


def _add_cluster_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sources = commands.add_parser("sources", help="the sources a group of `run --group` workers shares, on Kafka")
    actions = sources.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="add sources to the catalog, or replace those of the same id")
    add.add_argument("--source", action="append", metavar="[ID=]URI", help="a source (repeatable), as `run` takes it")
    add.add_argument(
        "--file", type=Path, metavar="SOURCES.yaml", help="the `sources:` list of this YAML, as a run config has it"
    )
    _add_per_source_flags(add)
    add.add_argument(
        "--partitions",
        type=_bounded(int, 1, None, "a partition count"),
        default=SOURCES_PARTITIONS,
        help=f"partitions of a new topic: the most workers that can share it (default: {SOURCES_PARTITIONS})",
    )
    add.set_defaults(handler=_sources_add)
    remove = actions.add_parser("remove", help="remove sources from the catalog: their workers stop them")
    remove.add_argument("ids", nargs="+", metavar="ID")
    remove.set_defaults(handler=_sources_remove)
    listing = actions.add_parser("list", help="the sources in the catalog, with their partitions")
    listing.add_argument("--json", action="store_true", help="one JSON object a line")
    listing.set_defaults(handler=_sources_list)
    for action in (add, remove, listing):
        _add_cluster_flags(action)
        action.add_argument("--topic", default=SOURCES_TOPIC, help=f"the sources topic (default: {SOURCES_TOPIC})")

    status = commands.add_parser("status", help="the workers of `run --group`: alive or not, and their sources")
    _add_cluster_flags(status)
    status.add_argument("--status-topic", default=STATUS_TOPIC, help=f"(default: {STATUS_TOPIC})")
    status.add_argument("--sources-topic", default=SOURCES_TOPIC, help=f"(default: {SOURCES_TOPIC})")
    status.add_argument("--group", help="only the workers of this group")
    status.add_argument("--json", action="store_true", help="everything as one JSON object")
    status.set_defaults(handler=_status)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="framelabel", description=__doc__)
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="what goes to stderr (default: info; debug adds the libraries' own lines)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve one classifier as a gRPC ImageClassifierService")
    serve.add_argument("--config", type=Path, help="service YAML (default: built-in defaults)")
    serve.add_argument("--classifier", help="classifier name from the classifiers file (default: imagenet)")
    serve.add_argument("--classifiers", type=Path, help="a classifiers YAML of your own, added to the built-in ones")
    serve.add_argument("--host", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default: 50051; 0 picks a free one)")
    serve.add_argument("--top-k", type=int, help="answer with the N most confident labels only")
    _add_metrics_flags(serve, "/metrics, /healthz and /readyz")
    serve.set_defaults(handler=_serve)

    annotate = commands.add_parser("annotate", help="annotate image files and print each response as JSON")
    annotate.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    where = annotate.add_mutually_exclusive_group()
    where.add_argument("--target", action="append", metavar="HOST:PORT", help="call a gRPC service (repeatable)")
    where.add_argument("--classifier", default="imagenet", help="run this classifier in-process (default)")
    annotate.add_argument("--classifiers", type=Path, help="a classifiers YAML of your own, added to the built-in ones")
    annotate.add_argument("--tls", action="store_true", help="use TLS to the target (system roots)")
    annotate.add_argument("--ca-file", type=Path, help="PEM roots for TLS to the target (implies --tls)")
    annotate.add_argument(
        "--retry-for", type=float, default=10.0, help="seconds to retry an unavailable target (default: 10)"
    )
    annotate.add_argument("--top", type=int, help="print only the N most confident annotations, and no label list")
    annotate.set_defaults(handler=lambda args: asyncio.run(_annotate_files(args)))

    run = commands.add_parser("run", help="capture → JPEG → Annotate → Kafka, for every source at once")
    run.add_argument(
        "config", nargs="?", type=Path, help="run YAML (default: the demo: sample clip, imagenet, embedded)"
    )
    run.add_argument(
        "--source",
        action="append",
        metavar="[ID=]URI",
        help="a source (repeatable; replaces the config's); without ID=, the id is the file's name or camera's host",
    )
    _add_per_source_flags(run)
    run_where = run.add_mutually_exclusive_group()
    run_where.add_argument("--classifier", help="annotate in-process with this classifier")
    run_where.add_argument("--target", action="append", metavar="HOST:PORT", help="annotate over gRPC (repeatable)")
    run.add_argument("--tls", action="store_true", help="TLS to the gRPC targets")
    run.add_argument("--bootstrap", metavar="ADDR|embedded", help="Kafka bootstrap servers, or `embedded`")
    run.add_argument("--topic", help=f"Kafka topic (default: {DEFAULT_TOPIC})")
    run.add_argument(
        "--no-idempotence",
        action="store_true",
        help="turn the idempotent producer off, for brokers without it such as Tansu (`framelabel broker`)",
    )
    run.add_argument(
        "--group",
        metavar="NAME",
        help="run as a worker of this group: the sources come from the topic `framelabel sources` manages",
    )
    _add_metrics_flags(run, "/metrics, /healthz, /readyz, the live view at / and /api/sources")
    run.set_defaults(handler=_run)

    consume = commands.add_parser("consume", help="print annotation records or events from Kafka as JSON lines")
    consume.add_argument(
        "--config", type=Path, help="read with the `kafka:` section of this run YAML (address, topic, TLS, SASL)"
    )
    consume.add_argument(
        "--bootstrap", help=f"Kafka bootstrap servers (default: the config's, or {DEFAULT_CONSUME_BOOTSTRAP})"
    )
    consume.add_argument("--topic", help=f"(default: the config's, or {DEFAULT_TOPIC})")
    consume.add_argument("--from-beginning", action="store_true", help="start at the oldest record, not the newest")
    consume.add_argument("--max", type=_bounded(int, 0, None, "a count"), metavar="N", help="stop after N records")
    consume.add_argument("--source", metavar="ID", help="only this source's records")
    consume.add_argument(
        "--min-confidence",
        type=_bounded(float, 0, 1, "a confidence"),
        metavar="X",
        help="only records with an annotation ≥ X (printed with those alone), and events whose peak reaches X",
    )
    consume.add_argument(
        "--idle-timeout",
        type=_bounded(float, 0.001, None, "a number of seconds"),
        metavar="S",
        help="stop when no record came for S seconds (waiting for the topic included)",
    )
    consume.add_argument("--group", metavar="ID", help="read in this consumer group and commit: a restart resumes")
    consume.set_defaults(handler=lambda args: asyncio.run(_consume(args)))

    events = commands.add_parser("events", help="turn annotation records into start/update/end events, on a topic")
    events.add_argument("config", nargs="?", type=Path, help="a run YAML: its `kafka:` and `events:` sections")
    events.add_argument(
        "--bootstrap", help=f"Kafka bootstrap servers (default: the config's, or {DEFAULT_CONSUME_BOOTSTRAP})"
    )
    events.add_argument(
        "--input-topic", help=f"the annotations topic (default: the config's kafka.topic, or {DEFAULT_TOPIC})"
    )
    events.add_argument("--topic", help="the events topic (default: framelabel.events)")
    events.add_argument("--group", help="consumer group (default: framelabel-events)")
    events.add_argument(
        "--delivery",
        choices=["auto", "exactly-once", "at-least-once"],
        help="auto (default): exactly once where the broker has transactions, else at least once",
    )
    events.set_defaults(handler=_events)

    _add_cluster_commands(commands)

    broker = commands.add_parser("broker", help="run the embedded Kafka-protocol broker (Tansu) on its own")
    broker.add_argument("--port", type=int, default=9092, help="port on 127.0.0.1 (default: 9092; 0 picks a free one)")
    broker.set_defaults(handler=_broker)

    health = commands.add_parser("health", help="ask a `framelabel serve` whether it is serving (exit 0 if so)")
    health.add_argument("--target", default="127.0.0.1:50051", help="HOST:PORT (default: 127.0.0.1:50051)")
    health.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer (default: 3)")
    health.set_defaults(handler=_health)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        code: int = args.handler(args)
    except FramelabelError as exc:
        print(f"framelabel: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader of our stdout went away (`| head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
