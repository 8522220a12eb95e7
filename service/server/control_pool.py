"""Health, readiness and metadata calls run on threads that scoring cannot take.

gRPC's sync server runs every call on one thread pool unless the handler's behavior names
another (its ``experimental_thread_pool`` attribute). :class:`ControlPoolInterceptor` gives
the calls of :data:`CONTROL_METHODS` a pool of :data:`CONTROL_THREADS` threads of their
own: however many scoring calls run or wait, a probe's ``Check`` finds a free thread at
once (Kubernetes' probe timeout is 1 s). Their handlers only read state, so a few threads
serve many probes; the p99 under full load is measured by ``tests/bench/bench_health.py``.
"""

from __future__ import annotations

from concurrent import futures

import grpc

CONTROL_THREADS = 4
CONTROL_METHODS = frozenset(
    (
        "/grpc.health.v1.Health/Check",
        "/inference.GRPCInferenceService/ServerLive",
        "/inference.GRPCInferenceService/ServerReady",
        "/inference.GRPCInferenceService/ModelReady",
        "/inference.GRPCInferenceService/ServerMetadata",
        "/inference.GRPCInferenceService/ModelMetadata",
        "/densemap.v1.Densemap/ListModels",
        "/densemap.v1.Densemap/GetModel",
    )
)


class ControlPoolInterceptor(grpc.ServerInterceptor):
    """Run the unary calls of :data:`CONTROL_METHODS` on the control threads.

    Put it before every interceptor that wraps handlers: gRPC looks for the pool on the
    outermost handler.
    """

    def __init__(self) -> None:
        self.pool = futures.ThreadPoolExecutor(
            max_workers=CONTROL_THREADS, thread_name_prefix="densemap-control"
        )

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if (
            handler is None
            or handler_call_details.method not in CONTROL_METHODS
            or handler.request_streaming
            or handler.response_streaming
        ):
            return handler
        behavior = handler.unary_unary

        def control(request, context):
            return behavior(request, context)

        control.experimental_thread_pool = self.pool
        return grpc.unary_unary_rpc_method_handler(
            control,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
