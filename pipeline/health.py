"""`framelabel health`: ask a running `framelabel serve` through the standard gRPC health service.

For a container's HEALTHCHECK and for scripts: no TLS, no credentials (the
service answers health checks without them).
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.api_names import SERVICE_NAME


def check_serving(target: str, timeout_s: float) -> tuple[bool, str]:
    """Whether the Annotate service at `target` is SERVING, and the status (or error) in words."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            answer = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=timeout_s)
        except grpc.RpcError as exc:
            return False, f"{exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    return answer.status == health_pb2.HealthCheckResponse.SERVING, status
