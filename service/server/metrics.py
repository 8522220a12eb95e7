"""Prometheus metrics of the server, served over plain HTTP on ``--metrics-host`` (127.0.0.1
by default: no TLS, no token, so this host only unless told) and ``--metrics-port`` (0 = off).

Each server owns its registry, so several servers (tests) never collide.

- ``densemap_requests_total{model,api,code}``: finished requests by gRPC status.
- ``densemap_stage_seconds{model,stage}``: latency of queue, decode, infer, encode.
- ``densemap_in_flight_requests{model}``: engine calls running now.
- ``densemap_input_pixels{model}``: pixels per scored image.
- ``densemap_model_loaded{model}``: 1 while the model is served, 0 after it was removed.
- ``densemap_log_records_dropped_total``: log records lost to a log reader that went away
  or fell behind (``densemap.service.server.log_stream.DroppingHandler``; the log never blocks).
- ``process_resident_memory_bytes``, ``process_cpu_seconds_total`` (and the other
  ``process_*`` series of prometheus-client's ``ProcessCollector``, read from /proc on
  Linux): the server process's RSS and CPU time. The collector registers only on
  prometheus-client's global registry by default, so each server adds it to its own.
"""

from __future__ import annotations

import logging

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)

from densemap.service.server.log_stream import dropped_records

log = logging.getLogger("densemap.server")

UNKNOWN_MODEL = "_unknown"  # label for names that are not served (bounded label values)
STAGES = ("queue", "decode", "infer", "encode")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
PIXEL_BUCKETS = tuple(float(4**k) for k in range(5, 15))  # 1 Ki .. 256 Mi pixels


class ServerMetrics:
    """The server's metric families and, once started, their HTTP endpoint."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "densemap_requests",
            "Finished requests by model, API and gRPC status code.",
            ["model", "api", "code"],
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "densemap_stage_seconds",
            "Server-side latency of one request stage (queue, decode, infer, encode).",
            ["model", "stage"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "densemap_in_flight_requests",
            "Engine calls running now.",
            ["model"],
            registry=self.registry,
        )
        self.input_pixels = Histogram(
            "densemap_input_pixels",
            "Pixels (height x width) of each scored image.",
            ["model"],
            buckets=PIXEL_BUCKETS,
            registry=self.registry,
        )
        self.model_loaded = Gauge(
            "densemap_model_loaded",
            "1 while the model is loaded and served, 0 once removed.",
            ["model"],
            registry=self.registry,
        )
        Gauge(
            "densemap_log_records_dropped_total",
            "Log records dropped because the log reader went away or fell behind.",
            registry=self.registry,
        ).set_function(lambda: float(dropped_records()))
        ProcessCollector(registry=self.registry)  # RSS, CPU seconds, open fds (Linux)
        self._http = None

    def observe_stages(self, model: str, seconds: dict[str, float]) -> None:
        for stage in STAGES:
            if stage in seconds:
                self.stage_seconds.labels(model, stage).observe(seconds[stage])

    def set_loaded(self, names: list[str] | tuple[str, ...], previous: set[str]) -> None:
        for name in names:
            self.model_loaded.labels(name).set(1)
        for name in previous - set(names):
            self.model_loaded.labels(name).set(0)

    def start(self, *, host: str, port: int) -> int:
        """Serve /metrics on ``host:port`` (port 0 picks one); returns the bound port."""
        self._http, _thread = start_http_server(port, addr=host, registry=self.registry)
        bound = self._http.server_port
        log.info("metrics on http://%s:%d/metrics", host, bound, extra={"metrics_port": bound})
        return bound

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
