"""A request's body is received only once its room in the memory budget is reserved
(issue 19, point 3; ``service/server/uploads.py``).

gRPC receives a whole message before a handler sees it, so uploads that were then refused
held their bytes outside the budget (8 concurrent 192 MB uploads: 1.13x a 4 GiB limit).
A raw HTTP/2 client shows the mechanism: while other calls hold the room for uploads, a
new call is refused RESOURCE_EXHAUSTED having sent no more than the stream's initial
flow-control window of its body (the server never asked for the rest); with room, the
same call's whole body is let in. A body still arriving after ``--upload-grace-seconds``
gives its room to a call that needs it; one that is never sent ends INVALID_ARGUMENT.
A ScoreStream's every message is received the same way, and an idle stream, which holds
the room for its next message, gives it up past the grace like a stalled upload.
And a refused request is freed when its call ends: it was kept alive by reference cycles
(tracebacks, futures, gRPC's abort error) that only Python's cyclic garbage collector
frees, which big buffers do not make run (8 concurrent 8000² calls: 916 MiB of refused
requests stayed resident).
"""

from __future__ import annotations

import asyncio
import gc
import time

import grpc
import numpy as np
import pytest

from densemap.service._proto.densemap.v1 import densemap_pb2 as pb
from densemap.service._proto.densemap.v1 import densemap_pb2_grpc as pb_grpc
from densemap.service.errors import ImageTooLarge
from densemap.service.server import memory_budget
from densemap.service.server import uploads as uploads_module
from densemap.service.server.memory_budget import MemoryBudget
from densemap.service.server.status import ServerBusy
from densemap.service.server.uploads import Uploads
from tests.support.hostile_clients import StalledCalls, UploadCall, _Connection
from tests.support.server_fakes import wait_until
from tests.support.server_harness import (
    HOST,
    SERVING,
    array_request,
    channel,
    health_of,
    rgb_image,
    start_server,
)

SCORE = "/densemap.v1.Densemap/Score"
SCORE_STREAM = "/densemap.v1.Densemap/ScoreStream"
MESSAGE_BYTES = 64 << 20  # --max-message-mb 64: each upload reserves 128 MiB
INITIAL_WINDOW = 65535  # HTTP/2's initial stream window, which the server keeps (no BDP)
RESOURCE_EXHAUSTED = str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
INVALID_ARGUMENT = str(grpc.StatusCode.INVALID_ARGUMENT.value[0])


def tight_server(repo, **overrides):
    """A server with room for about two uploads of the largest request."""
    limit = (memory_budget.resident_bytes() + 5 * MESSAGE_BYTES) / (1 - memory_budget.HEADROOM)
    srv, port = start_server(
        repo, memory_limit=int(limit), max_message_bytes=MESSAGE_BYTES, **overrides
    )
    fits = srv.memory.for_requests // srv.uploads.upload_bytes()
    assert fits >= 1, "no room for one upload: the test process grew"
    return srv, port, fits


def big_request() -> bytes:
    """A valid raw Score request of 4.3 MB, with a small response (the raw client grants
    the server no more than the initial window to answer in)."""
    request = array_request(rgb_image(1200, 1200))
    request.options.omit_map = True
    return request.SerializeToString()


def test_an_upload_without_room_is_refused_before_its_body_is_read(repo):
    srv, port, fits = tight_server(repo)
    held = StalledCalls(HOST, port, SCORE, fits)  # headers only: each holds an upload's room
    upload = admitted = None
    try:
        wait_until(lambda: srv.uploads.pending == fits, what="the held calls' reservations")
        assert srv.memory.reserved == fits * srv.uploads.upload_bytes()
        request = big_request()
        upload = UploadCall(HOST, port, SCORE, request)
        wait_until(lambda: upload.status()[0] is not None, what="the refusal")
        code, message = upload.status()
        assert code == RESOURCE_EXHAUSTED, message
        assert "is received only once" in message and "--max-message-mb" in message
        assert upload.send_window() <= INITIAL_WINDOW < len(request)  # the rest never asked for
        with channel(f"{HOST}:{port}") as chan:
            assert health_of(chan, "readiness") == SERVING
        held.close()  # their room comes back: the same upload is now read whole, and scored
        wait_until(lambda: srv.memory.reserved == 0, what="the held calls' room to come back")
        admitted = UploadCall(HOST, port, SCORE, request)
        wait_until(lambda: admitted.send_window() == len(request) + 5, what="the whole body")
        wait_until(lambda: admitted.status()[0] is not None, timeout=60, what="the answer")
        assert admitted.status()[0] == "0"
        wait_until(lambda: srv.memory.reserved == 0, what="the reservations to be released")
    finally:
        for call in (held, upload, admitted):
            if call is not None:
                call.close()
        srv.stop()


def test_a_call_without_room_waits_for_it_and_is_read_once_room_comes_back(repo, monkeypatch):
    # a burst of honest requests is served, not refused: room comes back as calls end
    monkeypatch.setattr(uploads_module, "ADMIT_WAIT_SECONDS", 10.0)  # a slow machine's margin
    srv, port, fits = tight_server(repo)
    held = StalledCalls(HOST, port, SCORE, fits)
    waiting = None
    try:
        wait_until(lambda: srv.uploads.pending == fits, what="the held calls' reservations")
        request = big_request()
        waiting = UploadCall(HOST, port, SCORE, request)
        time.sleep(0.5)
        assert waiting.status()[0] is None, waiting.status()  # waiting, not refused
        assert waiting.send_window() <= INITIAL_WINDOW < len(request)  # and its body unread
        held.close()
        wait_until(lambda: waiting.send_window() == len(request) + 5, what="the whole body")
        wait_until(lambda: waiting.status()[0] is not None, timeout=60, what="the answer")
        assert waiting.status()[0] == "0", waiting.status()
        wait_until(lambda: srv.memory.reserved == 0, what="the reservations to be released")
    finally:
        held.close()
        if waiting is not None:
            waiting.close()
        srv.stop()


def test_a_stream_message_without_room_is_refused_before_it_is_read(repo, monkeypatch):
    monkeypatch.setattr(uploads_module, "ADMIT_WAIT_SECONDS", 0.2)
    srv, port, fits = tight_server(repo)
    held = StalledCalls(HOST, port, SCORE, fits)
    upload = admitted = None
    try:
        wait_until(lambda: srv.uploads.pending == fits, what="the held calls' reservations")
        request = big_request()  # a stream's message is framed as a unary request is
        upload = UploadCall(HOST, port, SCORE_STREAM, request)
        wait_until(lambda: upload.status()[0] is not None, what="the refusal")
        code, message = upload.status()
        assert code == RESOURCE_EXHAUSTED and "is received only once" in message, message
        assert upload.send_window() <= INITIAL_WINDOW < len(request)  # the rest never asked for
        held.close()
        wait_until(lambda: srv.memory.reserved == 0, what="the held calls' room to come back")
        admitted = UploadCall(HOST, port, SCORE_STREAM, request)
        wait_until(lambda: admitted.send_window() == len(request) + 5, what="the whole message")
    finally:
        for call in (held, upload, admitted):
            if call is not None:
                call.close()
        srv.stop()


def test_an_idle_stream_past_its_grace_gives_its_room_to_a_waiting_call(repo):
    grace = 2.0
    srv, port, fits = tight_server(repo, upload_grace_seconds=grace)
    idle = StalledCalls(HOST, port, SCORE_STREAM, fits)  # open streams that send nothing
    try:
        wait_until(lambda: srv.uploads.pending == fits, what="the idle streams' reservations")
        time.sleep(grace + 0.2)
        with channel(f"{HOST}:{port}") as chan:  # the newcomer ends the oldest idle stream
            assert pb_grpc.DensemapStub(chan).Score(array_request(rgb_image()), timeout=30).maps
        assert idle.ended() == 1 and srv.uploads.pending == fits - 1
        ended = [s for s in idle.streams if idle.connection.status(s)[0] is not None]
        code, message = idle.connection.status(ended[0])
        assert code == RESOURCE_EXHAUSTED and "--upload-grace-seconds" in message
    finally:
        idle.close()
        srv.stop()


def test_a_body_past_its_grace_gives_its_room_to_a_waiting_call(repo):
    grace = 3.0
    srv, port, fits = tight_server(repo, upload_grace_seconds=grace)
    held = StalledCalls(HOST, port, SCORE, fits, drip=0.2)  # a prefix, then a byte per 0.2 s
    try:
        wait_until(lambda: srv.uploads.pending == fits, what="the held calls' reservations")
        opened = time.monotonic()
        with channel(f"{HOST}:{port}") as chan:
            stub = pb_grpc.DensemapStub(chan)
            with pytest.raises(grpc.RpcError) as caught:
                stub.Score(array_request(rgb_image()), timeout=30)
            assert time.monotonic() - opened < grace, "the machine was too slow to test this"
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            time.sleep(grace - (time.monotonic() - opened) + 0.2)
            assert stub.Score(array_request(rgb_image()), timeout=30).maps  # the oldest ends
        assert held.ended() == 1 and srv.uploads.pending == fits - 1
        ended = [s for s in held.streams if held.connection.status(s)[0] is not None]
        code, message = held.connection.status(ended[0])
        assert code == RESOURCE_EXHAUSTED and "--upload-grace-seconds" in message
    finally:
        held.close()
        srv.stop()


def test_a_call_that_ends_without_its_request_is_invalid_argument(repo):
    srv, port, _fits = tight_server(repo)
    connection = _Connection(HOST, port)
    try:
        stream = connection.open_call(SCORE)
        connection.send(stream, b"", end=True)
        wait_until(lambda: connection.status(stream)[0] is not None, what="the status")
        code, message = connection.status(stream)
        assert code == INVALID_ARGUMENT and "ended before its request" in message
        wait_until(lambda: srv.memory.reserved == 0, what="its room to come back")
    finally:
        connection.close()
        srv.stop()


@pytest.mark.parametrize("refusal", ["compute", "invalid"])
def test_a_refused_request_is_freed_when_its_call_ends(repo, refusal):
    srv, port, _fits = tight_server(repo, max_request_gmacs=1.0)
    request = array_request(rgb_image(700, 700))
    request.request_id = f"refused-{refusal}"
    if refusal == "compute":  # RESOURCE_EXHAUSTED by its MACs, on the scoring thread
        request.options.scales[:] = [8.0]
    else:  # INVALID_ARGUMENT from the engine, on the scoring thread
        request.options.output_stride = 3
    gc.collect()
    gc.disable()  # what is freed must be freed by reference counts, as in the server
    try:
        with channel(f"{HOST}:{port}") as chan:
            with pytest.raises(grpc.RpcError) as caught:
                pb_grpc.DensemapStub(chan).Score(request, timeout=60)
        expected = {"compute": "RESOURCE_EXHAUSTED", "invalid": "INVALID_ARGUMENT"}[refusal]
        assert caught.value.code().name == expected, caught.value.details()
        wait_until(lambda: srv.memory.reserved == 0, what="the call to end")
        alive = [
            o
            for o in gc.get_objects()
            if type(o) is pb.ScoreRequest and o.request_id == request.request_id
        ]
        assert [o for o in alive if o is not request] == []  # the server's copy is gone
    finally:
        gc.enable()
        srv.stop()


def test_a_reservation_is_trued_up_to_the_size_it_turns_out_to_need():
    budget = MemoryBudget(1000 << 20)
    room = budget.for_requests
    upload = budget.reserve(room // 2)
    upload.resize(1 << 20)  # the message was small
    assert budget.reserved == 1 << 20
    other = budget.reserve(room - (1 << 20))
    with pytest.raises(ServerBusy):
        upload.resize(2 << 20)  # growing needs room beside the others
    other.release()
    upload.resize(room)
    assert budget.reserved == room
    with pytest.raises(ImageTooLarge, match="over all the server has"):
        upload.resize(room + 1)
    upload.release()
    upload.resize(5)  # released: nothing to resize
    assert budget.reserved == 0
    assert np.isclose(room, 800 << 20, rtol=0.01)


def test_the_grace_must_be_a_positive_number_of_seconds(tmp_path):
    from densemap.service.errors import InvalidOption
    from densemap.service.server.config import ServerConfig

    for grace in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(InvalidOption, match="upload_grace_seconds must be finite and > 0"):
            ServerConfig(models_dir=tmp_path, upload_grace_seconds=grace)


class FakeContext:
    """The two things Uploads uses of a gRPC call: read() and done callbacks."""

    def __init__(self) -> None:
        self.message = asyncio.get_running_loop().create_future()
        self._callbacks = []

    async def read(self):
        return await self.message

    def add_done_callback(self, callback) -> None:
        self._callbacks.append(callback)

    def end(self) -> None:
        for callback in self._callbacks:
            callback(self)


def test_a_refusal_for_maps_ends_the_oldest_upload_past_its_grace():
    async def scenario():
        budget = MemoryBudget(1000 << 20)  # 800 MiB for requests
        uploads = Uploads(budget, max_message_bytes=100 << 20, grace_seconds=0.2)
        held = FakeContext()  # its body never comes
        receiving = asyncio.ensure_future(uploads.receive(held))
        await asyncio.sleep(0.02)
        assert uploads.pending == 1 and budget.reserved == 200 << 20
        with pytest.raises(ServerBusy):  # a call's maps, from a scoring thread
            await asyncio.to_thread(budget.reserve, 700 << 20)
        await asyncio.sleep(0.02)
        assert not receiving.done()  # within its grace: kept
        await asyncio.sleep(0.2)
        with pytest.raises(ServerBusy):
            await asyncio.to_thread(budget.reserve, 700 << 20)
        with pytest.raises(ServerBusy, match="--upload-grace-seconds"):
            await asyncio.wait_for(receiving, 5)  # ended, so that a retry finds room
        held.end()  # gRPC ends the call: its room comes back
        assert budget.reserved == 0 and uploads.pending == 0
        budget.reserve(700 << 20).release()
        arrives = FakeContext()  # an upload that arrives is trued up to 2x its size
        task = asyncio.ensure_future(uploads.receive(arrives))
        await asyncio.sleep(0.02)
        arrives.message.set_result(bytes(1000))
        raw, _reservation = await task
        assert len(raw) == 1000 and budget.reserved == 2000
        arrives.end()
        assert budget.reserved == 0

    asyncio.run(scenario())
