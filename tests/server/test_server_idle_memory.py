"""Memory goes back when the server goes idle, not only after big requests."""

from __future__ import annotations

import threading
import time

import numpy as np

from densemap.service._proto.densemap.v1 import densemap_pb2_grpc as pb_grpc
from densemap.service.engine.engine import Engine
from densemap.service.server.idle_memory import IdleRelease
from tests.support.server_harness import array_request, channel, rgb_image, start_server


def within(predicate, seconds: float) -> bool:
    """Whether ``predicate`` becomes true within ``seconds`` (polled every 10 ms)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


def test_release_runs_once_per_quiet_period_and_not_while_busy():
    released = []
    idle = IdleRelease(lambda: released.append(1), delay=0.05)
    try:
        idle.call_started()
        assert not within(lambda: released, 0.3)  # busy: nothing given back
        idle.all_calls_ended()
        assert within(lambda: released == [1], 5)
        assert not within(lambda: len(released) > 1, 0.3)  # once per period
        idle.call_started()
        idle.all_calls_ended()
        assert within(lambda: released == [1, 1], 5)
    finally:
        idle.stop()


def test_an_idle_server_gives_memory_back(repo, monkeypatch):
    released = threading.Event()
    original = Engine.release_memory

    def counting(engine):
        released.set()
        return original(engine)

    monkeypatch.setattr(Engine, "release_memory", counting)
    server, port = start_server(repo)
    try:
        server.idle_release._delay = 0.05
        stub = pb_grpc.DensemapStub(channel(f"127.0.0.1:{port}"))
        response = stub.Score(array_request(rgb_image()), 30)
        assert np.asarray(response.maps[0].cells.h) > 0
        assert released.wait(10)  # small request: only the idle release gives memory back
    finally:
        server.stop()
