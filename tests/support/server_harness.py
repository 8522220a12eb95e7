"""Helpers of the server and client tests: the tiny model repository, servers, channels.

The fixtures built on them live in conftests: ``repo`` in tests/conftest.py (end-to-end
tests use it too), ``server``, ``engines`` and ``client`` in tests/server/conftest.py.
Servers listen on 127.0.0.1 port 0 only.
"""

from __future__ import annotations

import io
import shutil
import socket
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from densemap.service._proto.densemap.v1 import densemap_pb2 as pb
from densemap.service.server.app import create_server
from densemap.service.server.config import ServerConfig
from tests.support.dense_models import build_dense_model

HOST = "127.0.0.1"
TINY = "tiny"  # RGB, 5 classes, window 12x16, stride 4, à-trous variant at stride 2
GREY = "grey"  # L, 3 classes, same layers, probabilities output


def build_repository(root: Path) -> Path:
    build_dense_model(root / TINY, channels=3, classes=5, with_atrous=(2,), seed=1)
    build_dense_model(
        root / GREY,
        channels=1,
        classes=3,
        seed=2,
        output_kind="probabilities",
        labels=("a", "b", "c"),
    )
    return root


def copy_repository(source: Path, target: Path, names=(TINY, GREY)) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copytree(source / name, target / name)
    return target


def test_config(models_dir: Path, **overrides) -> ServerConfig:
    settings = dict(models_dir=models_dir, host=HOST, port=0, metrics_port=0, grace_seconds=5.0)
    settings.update(overrides)
    return ServerConfig(**settings)


test_config.__test__ = False  # not a test, despite its name


def start_server(models_dir: Path, **overrides):
    """(server, port) of a ready server."""
    server, port = create_server(test_config(models_dir, **overrides))
    assert server.wait_ready(30), "models did not load within 30 s"
    return server, port


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def rgb_image(height: int = 40, width: int = 50, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def channel(target: str) -> grpc.Channel:
    limit = 256 * 1024 * 1024
    options = [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]
    return grpc.insecure_channel(target, options=options)


def array_request(image: np.ndarray, *, model: str = TINY, dtype=pb.UINT8, **options):
    """A densemap.v1 ScoreRequest carrying ``image`` as a raw array."""
    request = pb.ScoreRequest(model=model, options=pb.ScoreOptions(**options))
    request.image.array.data = image.tobytes()
    request.image.array.shape[:] = image.shape
    request.image.array.dtype = dtype
    return request


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def health_of(chan: grpc.Channel, service: str):
    """The health status of ``service``, or the status code of a failed check."""
    request = health_pb2.HealthCheckRequest(service=service)
    try:
        return health_pb2_grpc.HealthStub(chan).Check(request, timeout=5).status
    except grpc.RpcError as exc:
        return exc.code()
