"""Which threads serve which calls: probes and metadata never wait behind scoring."""

from __future__ import annotations

import threading

import tritonclient.grpc.service_pb2 as kserve_pb
import tritonclient.grpc.service_pb2_grpc as kserve_grpc
from grpc_health.v1 import health
from server_harness import (  # noqa: F401  (fixtures)
    HOST,
    SERVING,
    TINY,
    array_request,
    channel,
    health_of,
    repo,
    rgb_image,
    start_server,
)

from service._proto.densemap.v1 import densemap_pb2 as pb
from service._proto.densemap.v1 import densemap_pb2_grpc as pb_grpc
from service.server.densemap_servicer import DensemapServicer
from service.server.kserve_servicer import KServeServicer


def _recording(monkeypatch, cls, name: str, seen: dict[str, str]) -> None:
    original = getattr(cls, name)

    def method(self, request, context):
        seen[name] = threading.current_thread().name
        return original(self, request, context)

    monkeypatch.setattr(cls, name, method)


def test_probes_and_metadata_run_on_control_threads_scoring_on_its_own(repo, monkeypatch):  # noqa: F811
    seen: dict[str, str] = {}
    _recording(monkeypatch, health.HealthServicer, "Check", seen)
    for name in ("GetModel", "ListModels", "Score"):
        _recording(monkeypatch, DensemapServicer, name, seen)
    for name in ("ServerReady", "ModelMetadata"):
        _recording(monkeypatch, KServeServicer, name, seen)
    original_stream = DensemapServicer.ScoreStream

    def score_stream(self, requests, context):
        seen["ScoreStream"] = threading.current_thread().name
        yield from original_stream(self, requests, context)

    monkeypatch.setattr(DensemapServicer, "ScoreStream", score_stream)
    srv, port = start_server(repo)
    try:
        with channel(f"{HOST}:{port}") as chan:
            stub = pb_grpc.DensemapStub(chan)
            kserve = kserve_grpc.GRPCInferenceServiceStub(chan)
            assert health_of(chan, "readiness") == SERVING
            stub.GetModel(pb.GetModelRequest(name=TINY), timeout=5)
            stub.ListModels(pb.ListModelsRequest(), timeout=5)
            kserve.ServerReady(kserve_pb.ServerReadyRequest(), timeout=5)
            kserve.ModelMetadata(kserve_pb.ModelMetadataRequest(name=TINY), timeout=5)
            stub.Score(array_request(rgb_image()), timeout=30)
            assert len(list(stub.ScoreStream(iter([array_request(rgb_image())]), timeout=30))) == 1
    finally:
        srv.stop()
    for name in ("Check", "GetModel", "ListModels", "ServerReady", "ModelMetadata"):
        assert seen[name].startswith("densemap-control"), (name, seen[name])
    assert seen["Score"].startswith("densemap-score")
    assert seen["ScoreStream"].startswith("densemap-stream")
