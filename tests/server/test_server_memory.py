"""One memory budget for the whole server.

Each scoring call reserves its request, maps and response in the server's budget
(``--memory-limit``) before it queues, and holds them until its response has been read:
a client that never reads its 20 MB response keeps those bytes counted, so further calls
are refused with RESOURCE_EXHAUSTED instead of growing the process; closing it (or the
write timeout, for a client that reads nothing at all) gives them back.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from densemap.service._proto.densemap.v1 import densemap_pb2 as pb
from densemap.service._proto.densemap.v1 import densemap_pb2_grpc as pb_grpc
from densemap.service.errors import ImageTooLarge
from densemap.service.server import memory_budget
from densemap.service.server.memory_budget import MemoryBudget, cgroup_memory_limit
from densemap.service.server.status import ServerBusy
from tests.support.hostile_clients import UnreadCall
from tests.support.server_fakes import wait_until
from tests.support.server_harness import (
    HOST,
    SERVING,
    TINY,
    channel,
    health_of,
    png_bytes,
    start_server,
)

SCORE = "/densemap.v1.Densemap/Score"
# a ~20 MB response (1024² at stride 1, 5 classes) from a request of a few KB
BIG = pb.ScoreRequest(
    model=TINY,
    image={"encoded": png_bytes(np.zeros((1024, 1024, 3), dtype=np.uint8))},
    options={"output_stride": 1},
)


def test_cgroup_limit_is_read_from_v2_or_v1_and_no_limit_is_none(tmp_path):
    v2, v1 = tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes"
    v2.write_text("max\n")
    v1.write_text("9223372036854771712\n")  # cgroup v1's "no limit"
    assert cgroup_memory_limit((v2, v1)) is None
    v1.write_text("8589934592\n")
    assert cgroup_memory_limit((v2, v1)) == 8 << 30
    v2.write_text("4294967296\n")
    assert cgroup_memory_limit((v2, v1)) == 4 << 30
    assert cgroup_memory_limit((tmp_path / "absent",)) is None


def test_reservations_add_up_and_refusals_say_why():
    budget = MemoryBudget(1000 << 20)
    room = budget.for_requests
    assert room == int(1000 * (1 - memory_budget.HEADROOM)) << 20  # no baseline measured
    first = budget.reserve(room // 2)
    second = budget.reserve(room // 2)
    with pytest.raises(ServerBusy, match="other calls hold .* retry later with backoff"):
        budget.reserve(1 << 20)
    with pytest.raises(ImageTooLarge, match="over all the server has for requests"):
        budget.reserve(room + 1)
    first.release()
    first.release()  # once only
    assert budget.reserved == room // 2
    second.release()
    assert budget.reserved == 0


@pytest.mark.slow
def test_unread_responses_stay_counted_and_refuse_further_calls_until_closed(repo):
    srv, port = start_server(
        repo, memory_limit=memory_budget.resident_bytes() + (1 << 30), max_message_bytes=32 << 20
    )
    unread: list[UnreadCall] = []
    target = f"{HOST}:{port}"
    try:
        unread.append(UnreadCall(HOST, port, SCORE, BIG.SerializeToString()))
        wait_until(
            lambda: srv.uploads.pending == 0 and srv.memory.reserved > 20 << 20,
            what="the first call to be received and reserve its response",
        )
        need = srv.memory.reserved
        assert need > 20 << 20  # at least its response
        # a call is received only once room for the largest request is free besides the
        # reservations held (uploads.py); then it holds ``need``
        upload = srv.uploads.upload_bytes()
        fits = (srv.memory.for_requests - max(upload, need)) // need + 1
        assert fits >= 2
        for _ in range(fits - 1):
            unread.append(UnreadCall(HOST, port, SCORE, BIG.SerializeToString()))
        wait_until(lambda: srv.memory.reserved == fits * need, what="every reservation")
        with channel(target) as chan:
            stub = pb_grpc.DensemapStub(chan)
            with pytest.raises(grpc.RpcError) as caught:
                stub.Score(BIG, timeout=60)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "responses not yet read by their clients" in caught.value.details()
            assert health_of(chan, "readiness") == SERVING
            for call in unread:
                call.close()
            wait_until(lambda: srv.memory.reserved == 0, what="the reservations to be freed")
            assert len(stub.Score(BIG, timeout=60).maps[0].scores.data) == 5 * 1013 * 1009 * 4
            assert srv.memory.reserved == 0
    finally:
        for call in unread:
            call.close()
        srv.stop()


@pytest.mark.slow
def test_a_client_that_reads_nothing_is_dropped_after_the_write_timeout(repo):
    srv, port = start_server(repo, write_timeout_seconds=1.0)
    frozen = None
    try:
        frozen = UnreadCall(HOST, port, SCORE, BIG.SerializeToString(), reads=False)
        wait_until(lambda: srv.memory.reserved > 0, what="the call to reserve")
        wait_until(lambda: srv.memory.reserved == 0, timeout=20, what="the connection to drop")
    finally:
        if frozen is not None:
            frozen.close()
        srv.stop()


def test_a_request_is_reserved_before_it_is_parsed(repo):
    # room for about 10 MiB of requests: a 6.3 MB raw request (2 copies) does not fit
    limit = int((memory_budget.resident_bytes() + (10 << 20)) / (1 - memory_budget.HEADROOM))
    srv, port = start_server(repo, memory_limit=limit)
    try:
        srv.memory.measure_baseline()
        big = pb.ScoreRequest(model=TINY)
        big.image.array.dtype = pb.UINT8
        big.image.array.shape[:] = [1500, 1400, 3]
        big.image.array.data = bytes(1500 * 1400 * 3)
        with channel(f"{HOST}:{port}") as chan:
            with pytest.raises(grpc.RpcError) as caught:
                pb_grpc.DensemapStub(chan).Score(big, timeout=60)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "of server memory" in caught.value.details()
            assert health_of(chan, "readiness") == SERVING
        assert srv.memory.reserved == 0
    finally:
        srv.stop()
