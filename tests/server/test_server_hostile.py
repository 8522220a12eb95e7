"""Hostile requests: whatever a client sends, it gets a clear status at once.

- Malformed shapes are INVALID_ARGUMENT before any array is made (a 65-dimension shape used
  to reach numpy's reshape and come back INTERNAL).
- A request's compute (MACs of every pass, from the geometry) is admitted before it runs:
  a 64² PNG asking for 16 scales of 120 at stride 1 is RESOURCE_EXHAUSTED at once.
- Repeated fields are counted before they are converted or quoted: millions of scales,
  KServe parameters or typed contents are INVALID_ARGUMENT naming the field, its count and
  the limit, not seconds and gigabytes of conversion.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc.service_pb2 as kserve_pb
import tritonclient.grpc.service_pb2_grpc as kserve_grpc

from densemap.service._proto.densemap.v1 import densemap_pb2 as pb
from densemap.service._proto.densemap.v1 import densemap_pb2_grpc as pb_grpc
from densemap.service.server import request_counts
from tests.support.server_harness import (
    TINY,
    array_request,
    channel,
    png_bytes,
    rgb_image,
    start_server,
)

Code = grpc.StatusCode
GOOD = rgb_image(30, 30)
FLAT_PNG = png_bytes(np.zeros((64, 64, 3), dtype=np.uint8))  # a 64² PNG of ~100 bytes


@pytest.fixture(scope="module")
def stubs(server):
    _, target = server
    with channel(target) as chan:
        yield pb_grpc.DensemapStub(chan), kserve_grpc.GRPCInferenceServiceStub(chan)


def refused(call, request) -> str:
    """The details of a call that must end INVALID_ARGUMENT (short, no traceback)."""
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=60)
    assert caught.value.code() == Code.INVALID_ARGUMENT, caught.value.details()
    details = caught.value.details()
    assert "Traceback" not in details and len(details) < 2000
    return details


def kserve_image(shape=(30, 30, 3), raw=None) -> kserve_pb.ModelInferRequest:
    request = kserve_pb.ModelInferRequest(model_name=TINY)
    request.inputs.add(name="image", datatype="UINT8", shape=list(shape))
    request.raw_input_contents.append(GOOD.tobytes() if raw is None else raw)
    return request


def test_densemap_shape_of_65_dimensions_is_invalid_argument(stubs):
    request = pb.ScoreRequest(model=TINY)
    request.image.array.dtype = pb.UINT8
    request.image.array.shape[:] = [1] * 65
    request.image.array.data = b"\0"
    details = refused(stubs[0].Score, request)
    assert "image.array.shape has 65 entries" in details and "[H, W" in details


def test_densemap_huge_shape_is_counted_not_converted(stubs):
    request = pb.ScoreRequest(model=TINY)
    request.image.array.dtype = pb.UINT8
    request.image.array.shape.extend(np.ones(1_000_000, dtype=np.int64).tolist())
    assert "1000000 entries" in refused(stubs[0].Score, request)


def test_kserve_shape_of_65_dimensions_is_invalid_argument(stubs):
    details = refused(stubs[1].ModelInfer, kserve_image(shape=[1] * 65, raw=b"\0"))
    assert "inputs[0].shape has 65 entries" in details


def test_millions_of_scales_are_refused_by_count(stubs):
    request = pb.ScoreRequest(model=TINY, image={"encoded": png_bytes(GOOD)})
    request.options.scales.extend(np.ones(2_000_000).tolist())
    details = refused(stubs[0].Score, request)
    assert "options.scales has 2000000 entries, over the limit of 16" in details


@pytest.mark.parametrize(
    "field", ["classes", "heads", "detections.classes", "detections.box_offsets"]
)
def test_other_densemap_lists_are_counted(stubs, field):
    request = array_request(GOOD)
    count = {"detections.box_offsets": 5}.get(field, request_counts.MAX_CLASS_INDICES + 1)
    target = request.options
    if field.startswith("detections."):
        target, field = target.detections, field.split(".")[1]
    values = ["h"] * count if field == "heads" else [1] * count
    getattr(target, field).extend(values)
    assert f"has {count} entries" in refused(stubs[0].Score, request)


def test_kserve_scales_string_of_millions_is_refused_by_length(stubs):
    request = kserve_image()
    request.parameters["scales"].string_param = ",".join(["1"] * 1_000_000)
    details = refused(stubs[1].ModelInfer, request)
    assert "parameters['scales']" in details and "over the limit" in details


def test_kserve_too_many_parameters(stubs):
    request = kserve_image()
    for index in range(request_counts.MAX_PARAMETERS + 1):
        request.parameters[f"p{index}"].int64_param = index
    assert f"{request_counts.MAX_PARAMETERS + 1} entries" in refused(stubs[1].ModelInfer, request)


def test_kserve_typed_contents_over_the_limit_say_use_raw(stubs):
    count = request_counts.MAX_TYPED_CONTENTS + 1
    request = kserve_pb.ModelInferRequest(model_name=TINY)
    request.inputs.add(name="image", datatype="UINT8", shape=[1, count])
    request.inputs[0].contents.uint_contents.extend(np.zeros(count, dtype=np.uint32).tolist())
    details = refused(stubs[1].ModelInfer, request)
    assert "uint_contents" in details and "raw_input_contents" in details


def test_kserve_many_inputs_are_counted(stubs):
    request = kserve_image()
    for _ in range(request_counts.MAX_KSERVE_TENSORS):
        request.inputs.add(name="image", datatype="UINT8", shape=[1])
    assert "inputs has" in refused(stubs[1].ModelInfer, request)


def test_the_server_still_scores_after_the_hostile_requests(stubs):
    response = stubs[0].Score(array_request(GOOD), timeout=60)
    assert response.maps and response.image_size.h == 30


def costly_request(scales) -> pb.ScoreRequest:
    """The issue's few hundred bytes that ask for minutes of work (a small response)."""
    request = pb.ScoreRequest(model=TINY, image={"encoded": FLAT_PNG})
    request.options.scales[:] = scales
    request.options.output_stride = 1
    request.options.omit_map = True
    return request


def test_the_issues_costly_request_is_refused_by_its_compute(stubs):
    request = costly_request([120.0] * 16)
    assert request.ByteSize() < 400
    with pytest.raises(grpc.RpcError) as caught:
        stubs[0].Score(request, timeout=60)
    assert caught.value.code() == Code.RESOURCE_EXHAUSTED
    details = caught.value.details()
    assert "GMAC" in details and "--max-request-gmacs" in details and "scales" in details


def test_the_compute_limit_is_a_flag_and_admits_what_is_under_it(repo):
    srv, port = start_server(repo, max_request_gmacs=1.0)
    try:
        with channel(f"127.0.0.1:{port}") as chan:
            stub = pb_grpc.DensemapStub(chan)
            with pytest.raises(grpc.RpcError) as caught:
                stub.Score(costly_request([60.0]), timeout=60)  # ~12 GMAC on TINY
            assert caught.value.code() == Code.RESOURCE_EXHAUSTED
            assert "limit of 1.0 GMAC" in caught.value.details()
            response = stub.Score(costly_request([1.0]), timeout=60)  # ~0.02 GMAC
            assert response.image_size.h == 64
    finally:
        srv.stop()


def test_control_calls_refuse_big_requests_before_parsing(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from densemap.service.server.malformed import CONTROL_MESSAGE_BYTES

    _, target = server
    with channel(target) as chan:
        request = health_pb2.HealthCheckRequest(service="x" * (CONTROL_MESSAGE_BYTES + 1))
        details = refused(health_pb2_grpc.HealthStub(chan).Check, request)
        assert f"over the limit of {CONTROL_MESSAGE_BYTES}" in details
        name = pb.GetModelRequest(name="y" * (CONTROL_MESSAGE_BYTES + 1))
        assert "over the limit" in refused(pb_grpc.DensemapStub(chan).GetModel, name)
        ok = health_pb2.HealthCheckRequest(service="readiness")
        assert health_pb2_grpc.HealthStub(chan).Check(ok, timeout=10).status == 1  # SERVING
