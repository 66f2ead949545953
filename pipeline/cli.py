"""The `framelabel` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from google.protobuf import json_format

from pipeline.annotators import Annotator
from pipeline.annotators.grpc_client import GrpcAnnotator, GrpcSettings
from pipeline.annotators.in_process import InProcessAnnotator
from services.api.image_classifier_pb2 import AnnotationRequest, AnnotationResponse
from services.api.image_pb2 import Image
from services.classifier import load_classifier
from services.config import DEFAULT_CLASSIFIERS_FILE, load_service_config
from services.errors import FramelabelError, InvalidImageError
from services.imaging import ImageLimits, sniff_format

log = logging.getLogger("framelabel")


def response_json(response: AnnotationResponse) -> str:
    """The protobuf JSON mapping with the API reference's field names (`request_id`, …)."""
    return json_format.MessageToJson(response, preserving_proto_field_name=True, indent=None)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def _serve(args: argparse.Namespace) -> int:
    from services.server import serve

    config = load_service_config(
        args.config,
        {"classifier": args.classifier, "host": args.host, "port": args.port, "classifiers_file": args.classifiers},
    )
    overrides = {"top_k": args.top_k} if args.top_k else None
    classifier = load_classifier(
        config.classifier, config.classifiers_file, ImageLimits(config.max_image_bytes, config.max_pixels), overrides
    )
    asyncio.run(serve(config, classifier))
    return 0


def grpc_authorization(api_key_env: str, iam_token_env: str) -> str | None:
    """The `authorization` metadata from the environment, as Yandex's tools name it."""
    if api_key := os.environ.get(api_key_env):
        return f"Api-Key {api_key}"
    if token := os.environ.get(iam_token_env):
        return f"Bearer {token}"
    return None


def _annotator_for(args: argparse.Namespace) -> Annotator:
    if args.target:
        root = args.ca_file.read_bytes() if args.ca_file else None
        settings = GrpcSettings(
            targets=tuple(args.target),
            tls=args.tls or root is not None,
            root_certificates=root,
            authorization=grpc_authorization("YC_API_KEY", "YC_IAM_TOKEN"),
            retry_for_seconds=args.retry_for,
        )
        return GrpcAnnotator(settings)
    return InProcessAnnotator(load_classifier(args.classifier, args.classifiers))


async def _annotate_files(args: argparse.Namespace) -> int:
    annotator = _annotator_for(args)
    failures = 0
    try:
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
            print(response_json(response), flush=True)
    finally:
        await annotator.close()
    return 1 if failures else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="framelabel", description=__doc__)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve one classifier as a gRPC ImageClassifierService")
    serve.add_argument("--config", type=Path, help="service YAML (default: built-in defaults)")
    serve.add_argument("--classifier", help="classifier name from the classifiers file (default: imagenet)")
    serve.add_argument("--classifiers", type=Path, help=f"classifiers YAML (default: {DEFAULT_CLASSIFIERS_FILE})")
    serve.add_argument("--host", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default: 50051; 0 picks a free one)")
    serve.add_argument("--top-k", type=int, help="answer with the N most confident labels only")
    serve.set_defaults(handler=_serve)

    annotate = commands.add_parser("annotate", help="annotate image files and print each response as JSON")
    annotate.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    where = annotate.add_mutually_exclusive_group()
    where.add_argument("--target", action="append", metavar="HOST:PORT", help="call a gRPC service (repeatable)")
    where.add_argument("--classifier", default="imagenet", help="run this classifier in-process (default)")
    annotate.add_argument("--classifiers", type=Path, default=DEFAULT_CLASSIFIERS_FILE, help="classifiers YAML")
    annotate.add_argument("--tls", action="store_true", help="use TLS to the target (system roots)")
    annotate.add_argument("--ca-file", type=Path, help="PEM roots for TLS to the target (implies --tls)")
    annotate.add_argument("--retry-for", type=float, default=10.0, help="seconds to retry an unavailable target")
    annotate.add_argument("--top", type=int, help="print only the N most confident annotations, and no label list")
    annotate.set_defaults(handler=lambda args: asyncio.run(_annotate_files(args)))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        code: int = args.handler(args)
    except FramelabelError as exc:
        print(f"framelabel: error: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
