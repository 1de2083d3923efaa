"""An outside gRPC client for the embedded SPIRE's health and reflection services, run as its own process.

    python grpc_outside_client.py unix:/path/to/api.sock   -> one JSON object on stdout

It uses grpcio with grpcio-health-checking and grpcio-reflection, whose generated modules register the same
protobuf symbols (grpc.health.v1.*, grpc.reflection.v1alpha.*) as grpclib's copies under other file names:
the two cannot be imported by one process, so the SPIRE (grpclib) and this client never share one.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import grpc  # type: ignore[import-untyped]
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc  # type: ignore[import-untyped]
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (  # type: ignore[import-untyped]
    ProtoReflectionDescriptorDatabase,
)

DEADLINE = 20.0


def probe(target: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with grpc.insecure_channel(target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "SpiffeWorkloadAPI", "no.such.Service"):
            try:
                resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=DEADLINE)
                out[f"check:{service}"] = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
            except grpc.RpcError as e:
                out[f"check:{service}"] = e.code().name
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=DEADLINE)
        out["watch:first"] = health_pb2.HealthCheckResponse.ServingStatus.Name(next(watch).status)
        watch.cancel()

        db = ProtoReflectionDescriptorDatabase(ch)
        out["services"] = sorted(db.get_services())
        pool = DescriptorPool(db)
        svc = pool.FindServiceByName("SpiffeWorkloadAPI")
        out["methods"] = {
            m.name: [m.input_type.full_name, m.output_type.full_name, m.server_streaming] for m in svc.methods
        }
        claims = pool.FindMessageTypeByName("ValidateJWTSVIDResponse").fields_by_name["claims"]
        out["claims_type"] = claims.message_type.full_name
    return out


if __name__ == "__main__":
    print(json.dumps(probe(sys.argv[1])))
