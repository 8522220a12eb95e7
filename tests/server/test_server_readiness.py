"""Readiness is a promise: a server is ready only while it serves at least
one model, and every model of --require-models; liveness stays SERVING meanwhile, and every
reload (SIGHUP, --poll-seconds) evaluates readiness again."""

from __future__ import annotations

import logging
import shutil

import grpc
import pytest
import tritonclient.grpc.service_pb2 as kserve_pb
import tritonclient.grpc.service_pb2_grpc as kserve_grpc

from densemap.service._proto.densemap.v1 import densemap_pb2 as pb
from densemap.service._proto.densemap.v1 import densemap_pb2_grpc as pb_grpc
from densemap.service.server.app import create_server
from densemap.service.server.readiness import evaluate
from tests.support.server_fakes import wait_until
from tests.support.server_harness import (
    GREY,
    HOST,
    SERVING,
    TINY,
    array_request,
    channel,
    copy_repository,
    health_of,
    rgb_image,
    test_config,
)

Code = grpc.StatusCode


class Probe:
    """What Kubernetes and a KServe client see of one server."""

    def __init__(self, port: int) -> None:
        self.chan = channel(f"{HOST}:{port}")
        self.kserve = kserve_grpc.GRPCInferenceServiceStub(self.chan)
        self.densemap = pb_grpc.DensemapStub(self.chan)

    def ready(self) -> bool:
        """readiness, "" and ServerReady, which must agree; liveness is always SERVING."""
        statuses = {health_of(self.chan, name) for name in ("readiness", "")}
        assert len(statuses) == 1, statuses
        server_ready = self.kserve.ServerReady(kserve_pb.ServerReadyRequest(), timeout=5).ready
        assert server_ready == (statuses == {SERVING}), (statuses, server_ready)
        assert health_of(self.chan, "liveness") == SERVING
        assert self.kserve.ServerLive(kserve_pb.ServerLiveRequest(), timeout=5).live
        return server_ready

    def score_code(self, model: str = TINY) -> grpc.StatusCode:
        image = rgb_image() if model != GREY else rgb_image()[:, :, :1].copy()
        try:
            self.densemap.Score(array_request(image, model=model), timeout=30)
        except grpc.RpcError as exc:
            return exc.code()
        return Code.OK


@pytest.fixture()
def serve(repo, tmp_path, caplog):
    """serve(names, broken=(), **config) -> (server, probe, root): a server on a copy of the
    shared repository's ``names`` plus a junk model per name of ``broken``, once its first
    load finished (ready or not)."""
    caplog.set_level(logging.INFO, logger="densemap.server")
    started = []

    def start(names=(), broken=(), **overrides):
        root = copy_repository(repo, tmp_path / "models", names=names)
        for name in broken:
            (root / name).mkdir()
            (root / name / "model.onnx").write_bytes(b"\0" * 64)
        srv, port = create_server(test_config(root, **overrides))
        started.append(srv)
        assert srv.wait_loaded(30), "the repository did not load within 30 s"
        probe = Probe(port)
        started.append(probe.chan)
        return srv, probe, root

    yield start
    for thing in started:
        thing.close() if isinstance(thing, grpc.Channel) else thing.stop()


def not_ready_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith("not ready: ")]


def test_an_empty_repository_is_alive_but_not_ready(serve, caplog):
    srv, probe, root = serve(())
    assert not probe.ready() and not srv.wait_ready(0.1)
    (record,) = not_ready_records(caplog)
    assert "no model is served" in record.getMessage()
    assert "holds no model folder" in record.getMessage() and str(root) in record.getMessage()
    assert record.levelno == logging.ERROR
    assert probe.score_code() == Code.NOT_FOUND  # calls are answered: no model by that name


def test_a_repository_whose_every_model_failed_to_load_is_not_ready(serve, caplog):
    srv, probe, root = serve((), broken=("broken", "junk"))
    assert not probe.ready()
    (record,) = not_ready_records(caplog)
    assert "every model" in record.getMessage() and "'broken', 'junk'" in record.getMessage()
    failures = probe.densemap.ListModels(pb.ListModelsRequest(), timeout=5).failures
    assert {f.name for f in failures} == {"broken", "junk"}
    assert probe.score_code("broken") == Code.NOT_FOUND


def test_one_good_model_is_ready_beside_broken_ones(serve, caplog):
    srv, probe, root = serve((TINY,), broken=("broken",))
    assert probe.ready() and srv.wait_ready(0)
    assert not not_ready_records(caplog)
    assert any(r.getMessage() == "ready: 1 model(s): tiny" for r in caplog.records)
    assert probe.score_code() == Code.OK


def test_require_models_missing_one_is_not_ready_and_the_log_says_which(repo, serve, caplog):
    srv, probe, root = serve((TINY,), broken=("vgg",), require_models=(TINY, GREY, "vgg"))
    assert not probe.ready()
    (record,) = not_ready_records(caplog)
    message = record.getMessage()
    assert "--require-models" in message and "'grey' is not in" in message
    assert "'vgg' failed to load" in message and "'tiny'" not in message
    assert record.missing_models == [GREY, "vgg"]  # a field of its JSON line (--log-json)
    # what is served is still answered; ModelReady is per model
    assert probe.score_code() == Code.OK
    model_ready = probe.kserve.ModelReady(kserve_pb.ModelReadyRequest(name=TINY), timeout=5)
    assert model_ready.ready
    shutil.copytree(repo / GREY, root / GREY)
    srv.reload()
    assert not probe.ready()
    assert "'grey'" not in not_ready_records(caplog)[-1].getMessage()  # only vgg is missing
    shutil.rmtree(root / "vgg")  # no longer in the repository: still required, still missing
    srv.reload()
    assert not probe.ready() and "'vgg' is not in" in not_ready_records(caplog)[-1].getMessage()
    shutil.copytree(repo / TINY, root / "vgg")
    srv.reload()
    assert probe.ready() and srv.wait_ready(0)


def test_every_reload_re_evaluates_readiness_and_logs_only_changes(repo, serve, caplog):
    srv, probe, root = serve((), poll_seconds=0.1)
    assert not probe.ready()
    shutil.copytree(repo / TINY, root / TINY)
    wait_until(
        lambda: srv.wait_ready(0), what="the poller to load the model and make the server ready"
    )
    assert probe.ready() and health_of(probe.chan, TINY) == SERVING
    shutil.rmtree(root / TINY)
    wait_until(lambda: not srv.wait_ready(0), what="the poller to see the model gone")
    assert not probe.ready() and health_of(probe.chan, TINY) != SERVING
    srv.reload()  # what SIGHUP does: nothing changed, nothing more logged
    srv.reload()
    assert len(not_ready_records(caplog)) == 2  # one line per change, not one per reload
    ready_lines = [r for r in caplog.records if r.getMessage().startswith("ready: ")]
    assert len(ready_lines) == 1


def test_evaluate_names_each_reason():
    assert evaluate(["a"], {}).ready
    assert evaluate(["a", "b"], {"c": "bad"}, ["b"]).ready
    empty = evaluate([], {}, (), "the model repository /srv/models")
    assert not empty.ready and "/srv/models holds no model folder" in empty.problem
    broken = evaluate([], {"x": "not onnx"})
    assert "every model" in broken.problem and "'x'" in broken.problem
    missing = evaluate(["a"], {"b": "not onnx"}, ["a", "b", "c"])
    assert missing.missing == ("b", "c")
    assert "'b' failed to load (not onnx)" in missing.problem and "'c' is not in" in missing.problem
