"""Bad requests: each gets its exact status code and a helpful message; the server lives on."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tritonclient
import tritonclient.grpc.service_pb2 as kserve_pb
import tritonclient.grpc.service_pb2_grpc as kserve_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from densemap.service._proto.densemap.v1 import densemap_pb2 as pb
from densemap.service._proto.densemap.v1 import densemap_pb2_grpc as pb_grpc
from densemap.service.engine import EngineConfig
from tests.support.server_harness import (
    GREY,
    TINY,
    array_request,
    channel,
    png_bytes,
    rgb_image,
    start_server,
)

Code = grpc.StatusCode


def raw_request(data: bytes, shape, dtype, model: str = TINY) -> pb.ScoreRequest:
    request = pb.ScoreRequest(model=model)
    request.image.array.data = data
    request.image.array.shape[:] = shape
    request.image.array.dtype = dtype
    return request


GOOD = rgb_image(30, 30)
NAN_CHW = np.full((3, 30, 30), np.nan, dtype=np.float32)


def options_request(**options) -> pb.ScoreRequest:
    encoded = png_bytes(GOOD)
    return pb.ScoreRequest(model=TINY, image={"encoded": encoded}, options=options)


# case -> (request, status code, a word the message must contain)
DENSEMAP_CASES = {
    "unknown model": (array_request(GOOD, model="nope"), Code.NOT_FOUND, "nope"),
    "model name as a path": (array_request(GOOD, model=f"../{TINY}"), Code.NOT_FOUND, "served"),
    "no image": (pb.ScoreRequest(model=TINY), Code.INVALID_ARGUMENT, "no image"),
    "empty encoded image": (
        pb.ScoreRequest(model=TINY, image={"encoded": b""}),
        Code.INVALID_ARGUMENT,
        "empty",
    ),
    "undecodable bytes": (
        pb.ScoreRequest(model=TINY, image={"encoded": b"GIF89a not really"}),
        Code.INVALID_ARGUMENT,
        "decode",
    ),
    "shape and bytes mismatch": (
        raw_request(b"\0" * 100, [30, 30, 3], pb.UINT8),
        Code.INVALID_ARGUMENT,
        "2700 bytes",
    ),
    "int32 image": (raw_request(b"\0" * 3600, [30, 30], pb.INT32), Code.INVALID_ARGUMENT, "INT32"),
    "unspecified dtype": (
        raw_request(b"\0" * 900, [30, 30], pb.DTYPE_UNSPECIFIED),
        Code.INVALID_ARGUMENT,
        "DTYPE_UNSPECIFIED",
    ),
    "rank-4 uint8": (
        raw_request(b"\0" * 2700, [1, 30, 30, 3], pb.UINT8),
        Code.INVALID_ARGUMENT,
        "rank",
    ),
    "rank-2 float": (
        raw_request(b"\0" * 3600, [30, 30], pb.FLOAT32),
        Code.INVALID_ARGUMENT,
        "rank",
    ),
    "zero-sized dimension": (
        raw_request(b"", [0, 30, 3], pb.UINT8),
        Code.INVALID_ARGUMENT,
        "positive",
    ),
    "four channels for an RGB model": (
        raw_request(b"\0" * 3600, [30, 30, 4], pb.UINT8),
        Code.INVALID_ARGUMENT,
        "channel",
    ),
    "image smaller than the window": (
        array_request(rgb_image(8, 30)),
        Code.INVALID_ARGUMENT,
        "window",
    ),
    "NaN in a float image": (
        array_request(NAN_CHW, dtype=pb.FLOAT32),
        Code.INVALID_ARGUMENT,
        "NaN",
    ),
    "unsupported output stride": (
        options_request(output_stride=3),
        Code.INVALID_ARGUMENT,
        "stride",
    ),
    "negative output stride": (options_request(output_stride=-2), Code.INVALID_ARGUMENT, "stride"),
    "zero scale": (options_request(scales=[1.0, 0.0]), Code.INVALID_ARGUMENT, "scales"),
    "top-k above the class count": (options_request(top_k=6), Code.INVALID_ARGUMENT, "top_k"),
    "class index out of range": (options_request(classes=[0, 5]), Code.INVALID_ARGUMENT, "[5]"),
    "int32 map dtype": (options_request(dtype=pb.INT32), Code.INVALID_ARGUMENT, "FLOAT16"),
    "unknown output enum": (options_request(output=7), Code.INVALID_ARGUMENT, "LOGITS"),
    "logits from a softmax model": (
        array_request(GOOD[:, :, :1], model=GREY, output=pb.LOGITS),
        Code.INVALID_ARGUMENT,
        "probabilities",
    ),
}


def kserve_request(*, name="image", datatype="UINT8", shape=(30, 30, 3), raw=None, **params):
    request = kserve_pb.ModelInferRequest(model_name=TINY)
    request.inputs.add(name=name, datatype=datatype, shape=list(shape))
    if raw is not False:
        request.raw_input_contents.append(GOOD.tobytes() if raw is None else raw)
    for key, value in params.items():
        field = {bool: "bool_param", int: "int64_param", str: "string_param"}[type(value)]
        setattr(request.parameters[key], field, value)
    return request


def two_inputs() -> kserve_pb.ModelInferRequest:
    request = kserve_request()
    request.inputs.add(name="image_bytes", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(b"\0\0\0\0")
    return request


def unknown_output() -> kserve_pb.ModelInferRequest:
    request = kserve_request()
    request.outputs.add(name="scores_1")  # one scale only
    return request


def top_k_output_without_top_k() -> kserve_pb.ModelInferRequest:
    request = kserve_request()
    request.outputs.add(name="top_k_indices")
    return request


def raw_and_contents() -> kserve_pb.ModelInferRequest:
    request = kserve_request()
    request.inputs[0].contents.uint_contents.extend([1] * GOOD.size)
    return request


def out_of_range_uint_contents() -> kserve_pb.ModelInferRequest:
    request = kserve_request()
    del request.raw_input_contents[:]
    request.inputs[0].contents.uint_contents.extend([300] * GOOD.size)
    return request


def classification_output() -> kserve_pb.ModelInferRequest:
    request = kserve_request()  # what tritonclient's InferRequestedOutput(class_count=3) sends
    request.outputs.add(name="scores").parameters["classification"].int64_param = 3
    return request


def model_version(version: str) -> kserve_pb.ModelInferRequest:
    request = kserve_request()
    request.model_version = version
    return request


def encoded_with_shape(shape) -> kserve_pb.ModelInferRequest:
    encoded = png_bytes(GOOD)
    prefixed = len(encoded).to_bytes(4, "little") + encoded
    return kserve_request(name="image_bytes", datatype="BYTES", shape=shape, raw=prefixed)


def shared_memory_input() -> kserve_pb.ModelInferRequest:
    request = kserve_request(raw=False)  # what tritonclient's InferInput.set_shared_memory sends
    request.inputs[0].parameters["shared_memory_region"].string_param = "region"
    request.inputs[0].parameters["shared_memory_byte_size"].int64_param = GOOD.size
    return request


def shared_memory_output() -> kserve_pb.ModelInferRequest:
    request = kserve_request()
    request.outputs.add(name="scores").parameters["shared_memory_region"].string_param = "out"
    return request


KSERVE_CASES = {
    "unknown parameter": (kserve_request(stride=2), Code.INVALID_ARGUMENT),
    "output_stride as a string": (kserve_request(output_stride="2"), Code.INVALID_ARGUMENT),
    "bad scales string": (kserve_request(scales="1,x"), Code.INVALID_ARGUMENT),
    "dtype int8": (kserve_request(dtype="int8"), Code.INVALID_ARGUMENT),
    "negative top_k": (kserve_request(top_k=-1), Code.INVALID_ARGUMENT),
    "two inputs": (two_inputs(), Code.INVALID_ARGUMENT),
    "unknown input name": (kserve_request(name="pixels"), Code.INVALID_ARGUMENT),
    "FP32 image input": (kserve_request(datatype="FP32"), Code.INVALID_ARGUMENT),
    "raw size mismatch": (kserve_request(raw=b"\0" * 10), Code.INVALID_ARGUMENT),
    "BYTES without length prefix": (
        kserve_request(name="image_bytes", datatype="BYTES", shape=(1,), raw=png_bytes(GOOD)),
        Code.INVALID_ARGUMENT,
    ),
    "unknown output": (unknown_output(), Code.INVALID_ARGUMENT),
    "top-k output without top_k": (top_k_output_without_top_k(), Code.INVALID_ARGUMENT),
    "unknown model": (
        kserve_pb.ModelInferRequest(model_name="nope", inputs=[{"name": "image"}]),
        Code.NOT_FOUND,
    ),
    "raw and typed contents at once": (raw_and_contents(), Code.INVALID_ARGUMENT),
    "uint_contents over 255": (out_of_range_uint_contents(), Code.INVALID_ARGUMENT),
    "classification output (class_count)": (classification_output(), Code.INVALID_ARGUMENT),
    "unknown model version": (model_version("2"), Code.NOT_FOUND),
    "BYTES with scalar shape": (encoded_with_shape(()), Code.INVALID_ARGUMENT),
    "BYTES with negative shape": (encoded_with_shape((-1, -1)), Code.INVALID_ARGUMENT),
    "shared memory input": (shared_memory_input(), Code.INVALID_ARGUMENT),
    "shared memory output": (shared_memory_output(), Code.INVALID_ARGUMENT),
}
# a word each message must contain (what was wrong or what to do), where a case has one
KSERVE_WORDS = {
    "FP32 image input": "uint8",
    "raw and typed contents at once": "one of them",
    "uint_contents over 255": "0..255",
    "classification output (class_count)": "top_k",
    "unknown model version": "version",
    "BYTES with scalar shape": "[1]",
    "BYTES with negative shape": "[1]",
    "shared memory input": "set_data_from_numpy",
    "shared memory output": "shared memory",
}


@pytest.fixture(scope="module")
def stubs(server):
    _, target = server
    with channel(target) as chan:
        yield pb_grpc.DensemapStub(chan), kserve_grpc.GRPCInferenceServiceStub(chan), chan


def assert_code(call, request, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=30)
    assert caught.value.code() == code, caught.value.details()
    details = caught.value.details()
    assert details and "Traceback" not in details
    return details


@pytest.mark.parametrize("case", sorted(DENSEMAP_CASES))
def test_densemap_bad_request(stubs, case):
    request, code, word = DENSEMAP_CASES[case]
    assert word in assert_code(stubs[0].Score, request, code)


@pytest.mark.parametrize("case", sorted(KSERVE_CASES))
def test_kserve_bad_request(stubs, case):
    request, code = KSERVE_CASES[case]
    details = assert_code(stubs[1].ModelInfer, request, code)
    assert KSERVE_WORDS.get(case, "") in details


def test_kserve_version_one_or_empty_is_the_model(stubs):
    for version in ("", "1"):
        assert stubs[1].ModelInfer(model_version(version), timeout=30).outputs
    ready = stubs[1].ModelReady
    assert ready(kserve_pb.ModelReadyRequest(name=TINY, version="1"), timeout=5).ready
    assert not ready(kserve_pb.ModelReadyRequest(name=TINY, version="2"), timeout=5).ready
    request = kserve_pb.ModelMetadataRequest(name=TINY, version="2")
    assert "version" in assert_code(stubs[1].ModelMetadata, request, Code.NOT_FOUND)


def test_unknown_names_in_metadata_calls(stubs):
    assert_code(stubs[0].GetModel, pb.GetModelRequest(name="nope"), Code.NOT_FOUND)
    assert_code(stubs[1].ModelMetadata, kserve_pb.ModelMetadataRequest(name="nope"), Code.NOT_FOUND)


def test_triton_only_rpc_is_unimplemented(stubs):
    assert_code(stubs[1].ModelConfig, kserve_pb.ModelConfigRequest(name=TINY), Code.UNIMPLEMENTED)


def test_stock_tritonclient_extras_say_what_to_use_instead(server):
    client = tritonclient.InferenceServerClient(server[1])
    calls = {
        "ModelConfig": lambda: client.get_model_config(TINY),
        "ModelStatistics": lambda: client.get_inference_statistics(TINY),
        "RepositoryIndex": client.get_model_repository_index,
        "RepositoryModelLoad": lambda: client.load_model(TINY),
        "SystemSharedMemoryStatus": client.get_system_shared_memory_status,
        "CudaSharedMemoryStatus": client.get_cuda_shared_memory_status,
        "TraceSetting": client.get_trace_settings,
        "LogSettings": client.get_log_settings,
    }
    for method, call in calls.items():
        with pytest.raises(InferenceServerException) as caught:
            call()
        assert caught.value.status() == "StatusCode.UNIMPLEMENTED", method
        assert method in caught.value.message() and "instead" in caught.value.message()
    stream = kserve_grpc.GRPCInferenceServiceStub(channel(server[1])).ModelStreamInfer
    with pytest.raises(grpc.RpcError) as caught:
        list(stream(iter([kserve_request()]), timeout=10))
    assert caught.value.code() == Code.UNIMPLEMENTED and "ScoreStream" in caught.value.details()
    assert client.is_server_ready()  # still serving


def test_deadline_too_short_is_deadline_exceeded(stubs):
    with pytest.raises(grpc.RpcError) as caught:
        stubs[0].Score(array_request(rgb_image(400, 400), output_stride=1), timeout=0.001)
    assert caught.value.code() == Code.DEADLINE_EXCEEDED


def test_server_still_serves_after_all_bad_requests(stubs):
    for case in sorted(DENSEMAP_CASES):
        request, code, _ = DENSEMAP_CASES[case]
        assert_code(stubs[0].Score, request, code)
    response = stubs[0].Score(array_request(GOOD), timeout=30)
    assert list(response.maps[0].scores.shape) == [5, 5, 4]  # (30-12)//4+1, (30-16)//4+1
    health = health_pb2_grpc.HealthStub(stubs[2])
    status = health.Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_limits_give_resource_exhausted(repo):
    # 20² fits the budget, 40² does not (estimates count the NCHWc channel padding on CPU)
    engine = EngineConfig(max_pixels=40 * 40, memory_budget=80_000, tiling=False)
    srv, port = start_server(repo, engine=engine, max_message_bytes=1 << 20)
    try:
        with channel(f"127.0.0.1:{port}") as chan:
            stub = pb_grpc.DensemapStub(chan)
            over_pixels = assert_code(
                stub.Score, array_request(rgb_image(50, 50)), Code.RESOURCE_EXHAUSTED
            )
            assert "pixels" in over_pixels
            over_memory = assert_code(
                stub.Score, array_request(rgb_image(40, 40)), Code.RESOURCE_EXHAUSTED
            )
            assert "budget" in over_memory
            too_big = raw_request(b"\0" * (2 << 20), [1024, 2048], pb.UINT8)
            assert_code(stub.Score, too_big, Code.RESOURCE_EXHAUSTED)  # gRPC's message limit
            assert stub.Score(array_request(rgb_image(20, 20)), timeout=30).maps
    finally:
        srv.stop()


def test_response_over_the_message_limit_says_what_to_do(repo):
    srv, port = start_server(repo, max_message_bytes=64 << 10)
    image = rgb_image(100, 100)  # stride 1: 89 x 85 cells x 5 classes x 4 bytes = 151 KB
    try:
        with channel(f"127.0.0.1:{port}") as chan:
            stub = pb_grpc.DensemapStub(chan)
            too_big = array_request(image, output_stride=1)
            details = assert_code(stub.Score, too_big, Code.RESOURCE_EXHAUSTED)
            assert "--max-message-mb" in details and "output_stride" in details
            items = list(stub.ScoreStream(iter([too_big, array_request(image)]), timeout=30))
            assert items[0].error.code_name == "RESOURCE_EXHAUSTED"
            assert not items[1].HasField("error") and items[1].maps
            request = kserve_request(raw=image.tobytes(), shape=image.shape, output_stride=1)
            kserve = kserve_grpc.GRPCInferenceServiceStub(chan).ModelInfer
            assert "--max-message-mb" in assert_code(kserve, request, Code.RESOURCE_EXHAUSTED)
            assert stub.Score(array_request(image), timeout=30).maps  # native stride fits
    finally:
        srv.stop()


@pytest.mark.parametrize(
    "method",
    [
        "/densemap.v1.Densemap/Score",
        "/densemap.v1.Densemap/ScoreStream",
        "/inference.GRPCInferenceService/ModelInfer",
        "/grpc.health.v1.Health/Check",
    ],
)
def test_bytes_that_are_not_the_message_are_invalid_argument(stubs, method):
    chan, garbage = stubs[2], b"\xff\xff\xff\xff\x0f"  # a truncated varint: no valid message
    identity = {"request_serializer": bytes, "response_deserializer": bytes}
    if method.endswith("Stream"):
        call = chan.stream_stream(method, **identity)
        details = assert_code(
            lambda r, timeout: list(call(iter([r]), timeout=timeout)),
            garbage,
            Code.INVALID_ARGUMENT,
        )
    else:
        details = assert_code(chan.unary_unary(method, **identity), garbage, Code.INVALID_ARGUMENT)
    assert method in details
    assert stubs[0].Score(array_request(GOOD), timeout=30).maps  # the server goes on
