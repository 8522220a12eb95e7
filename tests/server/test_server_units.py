"""Units of the server: the status table, admission (FIFO, caps), internal errors."""

from __future__ import annotations

import logging
import threading

import grpc
import pytest

from densemap.service._proto.densemap.v1 import densemap_pb2_grpc as pb_grpc
from densemap.service.engine import ModelRepository
from densemap.service.errors import (
    Cancelled,
    ConversionError,
    ImageTooLarge,
    ImageTooSmall,
    InvalidImage,
    InvalidOption,
    ModelLoadError,
    ModelNotFound,
)
from densemap.service.server.app import create_server
from densemap.service.server.config import ServerConfig
from densemap.service.server.limits import Admission, ServingState
from densemap.service.server.status import (
    DeadlineExceeded,
    MalformedRequest,
    NotServing,
    ResponseTooLarge,
    ServerBusy,
    Unauthenticated,
    Unsupported,
    status_for,
)
from tests.support.server_fakes import wait_until
from tests.support.server_harness import HOST, array_request, channel, rgb_image, test_config

Code = grpc.StatusCode


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidImage("x"), Code.INVALID_ARGUMENT),
        (ImageTooSmall("x"), Code.INVALID_ARGUMENT),
        (InvalidOption("x"), Code.INVALID_ARGUMENT),
        (ModelNotFound("x"), Code.NOT_FOUND),
        (ImageTooLarge("x"), Code.RESOURCE_EXHAUSTED),
        (ServerBusy("x"), Code.RESOURCE_EXHAUSTED),
        (MemoryError(), Code.RESOURCE_EXHAUSTED),
        (NotServing("x"), Code.UNAVAILABLE),
        (DeadlineExceeded("x"), Code.DEADLINE_EXCEEDED),
        (Cancelled("x"), Code.CANCELLED),
        (Unauthenticated("x"), Code.UNAUTHENTICATED),
        (MalformedRequest("x"), Code.INVALID_ARGUMENT),
        (ResponseTooLarge("x"), Code.RESOURCE_EXHAUSTED),
        (Unsupported("x"), Code.UNIMPLEMENTED),
        (ModelLoadError("x"), Code.FAILED_PRECONDITION),
        (ConversionError("x"), Code.INTERNAL),
        (KeyError("x"), Code.INTERNAL),
    ],
)
def test_status_table(error, code):
    assert status_for(error)[0] == code


def test_internal_errors_hide_details_and_log_an_incident(caplog):
    with caplog.at_level(logging.ERROR, logger="densemap.server"):
        code, message = status_for(RuntimeError("secret /srv/path"))
    assert code == Code.INTERNAL and "secret" not in message and "incident" in message
    incident = message.split("incident ")[1].split(")")[0]
    assert incident in caplog.text and "secret /srv/path" in caplog.text


class _Guard:
    """A CallGuard stand-in that never cancels."""

    def __call__(self) -> bool:
        return False

    def check(self) -> None:
        return None

    def remaining(self) -> float:
        return 60.0


def test_admission_is_fifo_per_model_and_caps_calls():
    admission = Admission(max_in_flight=1, max_queue=3, max_admitted=2)
    order: list[int] = []
    first = admission.model_slot("m", _Guard())
    first.__enter__()
    threads = []
    for index in range(3):
        thread = threading.Thread(target=lambda i=index: _run(admission, order, i))
        thread.start()
        wait_until(lambda i=index: admission.counts("m") == (1, i + 1), what="queueing")
        threads.append(thread)
    with pytest.raises(ServerBusy, match="max-queue"):
        with admission.model_slot("m", _Guard()):
            pass
    assert admission.counts("other") == (0, 0)
    with admission.model_slot("other", _Guard()) as queued:  # other models are not blocked
        assert queued < 1.0
    first.__exit__(None, None, None)
    for thread in threads:
        thread.join(10)
    assert order == [0, 1, 2]
    with admission.call_slot(), admission.call_slot():
        with pytest.raises(ServerBusy, match="scoring-threads"):
            with admission.call_slot():
                pass


def _run(admission: Admission, order: list[int], index: int) -> None:
    with admission.model_slot("m", _Guard()):
        order.append(index)


def test_serving_state_refuses_while_loading_and_draining():
    state = ServingState()
    with pytest.raises(NotServing, match="loading"):
        state.check_serving()
    state.set_ready(True)
    state.check_serving()
    state.begin_drain()
    with pytest.raises(NotServing, match="shutting down"):
        state.check_serving()
    assert state.wait_idle(0.1)


class _BrokenEngine:
    def __init__(self, engine) -> None:
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def score(self, image, options=None, *, cancel=None):
        raise RuntimeError("secret /srv/internal/path")


class _BrokenRepository:
    def __init__(self, repository) -> None:
        self._repository = repository
        self.names = repository.names
        self.errors = {}

    def get(self, name):
        return _BrokenEngine(self._repository.get(name))


def test_an_engine_bug_is_internal_without_details_and_the_server_goes_on(repo):
    srv, port = create_server(
        test_config(repo), open_repository=lambda: _BrokenRepository(ModelRepository(repo))
    )
    try:
        assert srv.wait_ready(20)
        with channel(f"{HOST}:{port}") as chan:
            stub = pb_grpc.DensemapStub(chan)
            for _ in range(2):
                with pytest.raises(grpc.RpcError) as caught:
                    stub.Score(array_request(rgb_image()), timeout=10)
                assert caught.value.code() == Code.INTERNAL
                assert "secret" not in caught.value.details()
                assert "incident" in caught.value.details()
    finally:
        srv.stop()


@pytest.mark.parametrize(
    "settings, word",
    [
        ({"port": 70000}, "ports"),
        ({"scoring_threads": 4}, "scoring_threads"),
        ({"grace_seconds": float("nan")}, "finite"),
        ({"poll_seconds": float("inf")}, "finite"),
        ({"engine": {"device": "cpu"}}, "EngineConfig"),  # EngineConfig checks its own fields
        ({"auth_token": "two words"}, "visible ASCII"),
        ({"auth_token": "line\nbreak"}, "visible ASCII"),
    ],
)
def test_bad_server_configuration_fails_before_serving(settings, word):
    with pytest.raises(InvalidOption) as caught:
        ServerConfig(**settings)
    assert word in str(caught.value)
