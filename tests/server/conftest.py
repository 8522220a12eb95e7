"""Fixtures of the server tests: one server on the shared ``repo`` (tests/conftest.py) per
module, the in-process engines every remote result is compared with, and a client."""

from __future__ import annotations

import pytest

from densemap.service.client import DensemapClient
from densemap.service.engine import Engine
from tests.support.server_harness import GREY, HOST, TINY, start_server


@pytest.fixture(scope="module")
def server(repo):
    """A ready server on the shared repository: (server, "127.0.0.1:<port>")."""
    srv, port = start_server(repo)
    yield srv, f"{HOST}:{port}"
    srv.stop()


@pytest.fixture(scope="module")
def engines(repo) -> dict[str, Engine]:
    """In-process engines of the same model files: the reference for every remote result."""
    return {name: Engine(repo / name / "model.onnx", name=name) for name in (TINY, GREY)}


@pytest.fixture(scope="module")
def client(server):
    """A densemap.v1 client of the module's server."""
    _, target = server
    with DensemapClient(target, timeout=30) as densemap_client:
        yield densemap_client
