"""``densemap health``: ask a server's grpc.health.v1 service; exit 0 when SERVING.

For exec probes where the kubelet's own gRPC probe cannot go: it speaks no TLS, so a server
started with ``--tls-cert`` needs this (deploy/k8s/overlays/tls). Light to import: grpc and
the health stubs only, so a probe costs a fraction of a second.
"""

from __future__ import annotations

import argparse
import os
import sys

from densemap.service.errors import InvalidOption

DEFAULT_SERVER = "localhost:50051"
NOT_SERVING_EXIT = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server", default=DEFAULT_SERVER, metavar="HOST:PORT", help="the server to ask"
    )
    parser.add_argument(
        "--service",
        default="readiness",
        help="health name: readiness, liveness, a model's name, or '' (the server)",
    )
    parser.add_argument("--tls", action="store_true", help="connect with TLS")
    parser.add_argument(
        "--ca-cert",
        metavar="PEM",
        help="the CA certificate that signed the server's (implies --tls; default: system roots)",
    )
    parser.add_argument(
        "--server-name",
        metavar="NAME",
        help="with TLS: the name the server's certificate holds, when --server is another "
        "address (a probe dials localhost; the certificate names the Service)",
    )
    parser.add_argument("--timeout", type=float, default=3.0, metavar="S", help="deadline, s")


def _channel(args: argparse.Namespace):
    import grpc

    if not (args.tls or args.ca_cert):
        return grpc.insecure_channel(args.server)
    roots = None
    if args.ca_cert:
        try:
            with open(args.ca_cert, "rb") as handle:
                roots = handle.read()
        except OSError as exc:
            raise InvalidOption(
                f"cannot read --ca-cert {args.ca_cert!r}: {exc.strerror or exc}; pass the PEM "
                "file of the CA that signed the server's certificate"
            ) from None
    options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
    credentials = grpc.ssl_channel_credentials(root_certificates=roots)
    return grpc.secure_channel(args.server, credentials, options=options)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # a probe prints one line, not gRPC's logs
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with _channel(args) as channel:
        request = health_pb2.HealthCheckRequest(service=args.service)
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"{args.server} {args.service!r}: {exc.code().name}: {exc.details()}")
            return NOT_SERVING_EXIT
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.server} {args.service!r}: {status}")
    sys.stdout.flush()
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else NOT_SERVING_EXIT
