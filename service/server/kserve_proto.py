"""KServe v2 message classes from a PRIVATE descriptor pool, and their method handlers.

Stock tritonclient registers ``inference.*`` messages (its own grpc_service.proto) in
protobuf's default pool, and protobuf refuses a second definition of a symbol in one
process. So the server builds its KServe classes from the generated FileDescriptorSet
(``service/_proto/inference/grpc_service_descriptor.py``) in a pool of its own: the server,
tritonclient and their tests share one process, and the wire format is the same.

:func:`reflection_pool` gathers every served service (densemap.v1, KServe, health,
reflection) into one more private pool for server reflection.
"""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from densemap.service._proto.inference.grpc_service_descriptor import FILE_DESCRIPTOR_SET
from densemap.service.server.status import Unsupported, status_for

SERVICE_NAME = "inference.GRPCInferenceService"
RPCS = (  # (method, request message, response message): all unary
    ("ServerLive", "ServerLiveRequest", "ServerLiveResponse"),
    ("ServerReady", "ServerReadyRequest", "ServerReadyResponse"),
    ("ModelReady", "ModelReadyRequest", "ModelReadyResponse"),
    ("ServerMetadata", "ServerMetadataRequest", "ServerMetadataResponse"),
    ("ModelMetadata", "ModelMetadataRequest", "ModelMetadataResponse"),
    ("ModelInfer", "ModelInferRequest", "ModelInferResponse"),
)
# Triton's extensions of the protocol: stock tritonclient can call them; each answers
# UNIMPLEMENTED with a message naming what to use instead (not gRPC's bare "Method not found").
TRITON_ONLY = {
    "ModelConfig": "ModelMetadata (inputs, outputs, shapes) or densemap.v1 GetModel",
    "ModelStatistics": "the Prometheus metrics (--metrics-port)",
    "RepositoryIndex": "densemap.v1 ListModels",
    "RepositoryModelLoad": "a model folder in the repository, then SIGHUP (or --poll-seconds)",
    "RepositoryModelUnload": "removing the model folder, then SIGHUP (or --poll-seconds)",
    "SystemSharedMemoryStatus": "raw_input_contents",
    "SystemSharedMemoryRegister": "raw_input_contents",
    "SystemSharedMemoryUnregister": "raw_input_contents",
    "CudaSharedMemoryStatus": "raw_input_contents",
    "CudaSharedMemoryRegister": "raw_input_contents",
    "CudaSharedMemoryUnregister": "raw_input_contents",
    "TraceSetting": "--log-level debug (one log line per request)",
    "LogSettings": "--log-level and --log-json",
    "ModelStreamInfer": "ModelInfer, or densemap.v1 ScoreStream for pipelined images",
}

_FILES = descriptor_pb2.FileDescriptorSet.FromString(FILE_DESCRIPTOR_SET).file
POOL = descriptor_pool.DescriptorPool()
_CLASSES = message_factory.GetMessages(list(_FILES), pool=POOL)


def message_class(name: str):
    """The class of ``inference.<name>`` (e.g. "ModelInferRequest")."""
    return _CLASSES[f"inference.{name}"]


ModelInferRequest = message_class("ModelInferRequest")
ModelInferResponse = message_class("ModelInferResponse")
ModelMetadataResponse = message_class("ModelMetadataResponse")
InferParameter = message_class("InferParameter")


def _unsupported_handler(method: str, instead: str) -> grpc.RpcMethodHandler:
    """A handler that ends the call UNIMPLEMENTED, saying what to use instead."""
    code, details = status_for(
        Unsupported(
            f"{method} is a Triton extension that densemap does not serve; instead: {instead}. "
            "The KServe v2 RPCs served are " + ", ".join(rpc[0] for rpc in RPCS)
        )
    )

    async def refuse(_requests, context):
        await context.abort(code, details)

    # request-streaming handlers: gRPC runs them at once, without waiting for a request body
    if method == "ModelStreamInfer":
        return grpc.stream_stream_rpc_method_handler(refuse)
    return grpc.stream_unary_rpc_method_handler(refuse)


def add_servicer_to_server(servicer, server: grpc.Server) -> None:
    """Register ``servicer``'s methods (named as the RPCs) under the KServe service name."""
    handlers = {
        method: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method),
            request_deserializer=message_class(request).FromString,
            response_serializer=message_class(response).SerializeToString,
        )
        for method, request, response in RPCS
    }
    for method, instead in TRITON_ONLY.items():
        handlers[method] = _unsupported_handler(method, instead)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def reflection_pool(default_pool_files) -> descriptor_pool.DescriptorPool:
    """A pool with the KServe files and copies of ``default_pool_files`` (FileDescriptors
    from the default pool, dependencies included), for the reflection service."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file_proto: descriptor_pb2.FileDescriptorProto) -> None:
        if file_proto.name not in added:
            pool.Add(file_proto)
            added.add(file_proto.name)

    def add_default(descriptor) -> None:
        for dependency in descriptor.dependencies:
            add_default(dependency)
        file_proto = descriptor_pb2.FileDescriptorProto()
        descriptor.CopyToProto(file_proto)
        add(file_proto)

    for file_proto in _FILES:
        add(file_proto)
    for descriptor in default_pool_files:
        add_default(descriptor)
    return pool
