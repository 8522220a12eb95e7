"""Typed configuration of the gRPC server, with its documented defaults.

Every field has a ``densemap serve`` flag and a ``DENSEMAP_*`` environment twin
(``service/serve_cli.py``); the defaults below are the ones both document.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from densemap.service.engine.options import DEFAULT_MEMORY_BUDGET, EngineConfig
from densemap.service.engine.repository import default_models_dir
from densemap.service.errors import InvalidOption

DEFAULT_HOST = "0.0.0.0"
DEFAULT_PORT = 50051
DEFAULT_METRICS_PORT = 9090  # 0 turns the Prometheus endpoint off
DEFAULT_METRICS_HOST = "127.0.0.1"  # plain HTTP: this host only, unless --metrics-host says
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # receive and send
DEFAULT_SCORING_THREADS = 32  # threads that score admitted calls, off the event loop
DEFAULT_MAX_IN_FLIGHT = 2  # engine calls running at once, per model
DEFAULT_MAX_QUEUE = 16  # requests waiting for a slot, per model; beyond: RESOURCE_EXHAUSTED
DEFAULT_GRACE_SECONDS = 30.0  # drain time for in-flight calls on SIGTERM/SIGINT
DEFAULT_POLL_SECONDS = 0.0  # 0: reload the repository only on SIGHUP
DEFAULT_MAX_CONNECTION_AGE_SECONDS = 0.0  # 0: connections live forever
DEFAULT_MAX_STREAMS = 16  # open streams (ScoreStream, health Watch, reflection) at once
DEFAULT_MAX_STREAMS_PER_PEER = 4  # open streams from one client address
DEFAULT_MAX_REQUEST_GMACS = 0.0  # 0: per model, from the pixel limit (compute_limit.py)
DEFAULT_STREAM_IDLE_SECONDS = 60.0  # a stream that sends nothing this long is closed
DEFAULT_UPLOAD_GRACE_SECONDS = 5.0  # a request still arriving this long may be ended for another
DEFAULT_WRITE_TIMEOUT_SECONDS = 30.0  # a connection that reads nothing this long is dropped
SERVER_BYTES_PER_PIXEL = 16  # decoded RGB uint8 (3) + its float32 copy (12), rounded up
RESERVED_SCORING_THREADS = 4  # the admitted calls are at most scoring_threads - this


def server_max_pixels(memory_budget: int) -> int:
    """The server's default pixel limit: what the memory budget holds decoded (64 M pixels,
    8192 x 8192, at the default 1 GiB), not the engine's 256 M: a few hundred bytes can
    declare that many pixels, and untrusted clients send them."""
    return max(1, memory_budget // SERVER_BYTES_PER_PIXEL)


def server_engine_config() -> EngineConfig:
    return EngineConfig(max_pixels=server_max_pixels(DEFAULT_MEMORY_BUDGET))


@dataclass(frozen=True)
class ServerConfig:
    """How :func:`densemap.service.server.app.create_server` binds, limits and loads.

    - ``models_dir``: repository root, one folder per model; None: ``$DENSEMAP_MODELS``,
      else the bundled repository (:func:`densemap.service.engine.repository.default_models_dir`).
    - ``host``/``port``: where gRPC listens; port 0 picks a free port.
    - ``metrics_host``/``metrics_port``: where the Prometheus endpoint (plain HTTP, no
      token) listens; 127.0.0.1 by default, so only this host reads it (a pod scraped by
      Prometheus sets 0.0.0.0); port 0 = off.
    - ``max_message_bytes``: max receive and send message size.
    - ``scoring_threads``: the threads admitted requests are scored in (the gRPC calls
      themselves wait on the event loop, holding no thread); at most
      ``scoring_threads - RESERVED_SCORING_THREADS`` scoring requests
      (unary calls and stream images being scored) are admitted, running or queued, at once.
    - ``max_streams``/``max_streams_per_peer``: open streams in all / from one client
      address; an idle one holds no thread. ``stream_idle_seconds``: a stream whose
      client sends nothing for this long is closed.
    - ``max_in_flight``/``max_queue``: per model, engine calls running / waiting.
    - ``max_request_gmacs``: the compute one request may ask for, in GMAC (multiply-
      accumulates of every pass, counted before it runs); 0: per model, twice one image at
      the pixel limit at native stride (:mod:`densemap.service.server.compute_limit`).
    - ``memory_limit``: bytes the whole server may use (RSS); scoring calls reserve their
      request, maps and response within it (:mod:`densemap.service.server.memory_budget`). None:
      the cgroup limit when there is one, else the machine's memory.
    - ``upload_grace_seconds``: a request body still arriving this long after its room in
      the budget was reserved is ended (RESOURCE_EXHAUSTED) when another call needs that
      room (:mod:`densemap.service.server.uploads`).
    - ``write_timeout_seconds``: a client connection that reads nothing (not even the
      server's keepalive pings) for this long is closed, with the responses it pinned.
    - ``grace_seconds``: how long a drain lets in-flight calls finish.
    - ``poll_seconds``: reload the repository every N seconds (0 = only on SIGHUP).
    - ``max_connection_age_seconds``: close client connections after this long, so
      clients re-resolve and spread over replicas (0 = never).
    - ``require_models``: names that must all be served for the server to be ready (on
      top of the rule that at least one model must be served).
    - ``tls_cert``/``tls_key``: PEM files; both or neither. ``auth_token``: required bearer
      token (None = no auth).
    - ``engine``: how models are loaded and run; its ``max_pixels`` defaults to
      :func:`server_max_pixels` of the memory budget.
    """

    models_dir: Path | None = None
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    metrics_port: int = DEFAULT_METRICS_PORT
    metrics_host: str = DEFAULT_METRICS_HOST
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    scoring_threads: int = DEFAULT_SCORING_THREADS
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    max_queue: int = DEFAULT_MAX_QUEUE
    max_request_gmacs: float = DEFAULT_MAX_REQUEST_GMACS
    memory_limit: int | None = None
    upload_grace_seconds: float = DEFAULT_UPLOAD_GRACE_SECONDS
    write_timeout_seconds: float = DEFAULT_WRITE_TIMEOUT_SECONDS
    max_streams: int = DEFAULT_MAX_STREAMS
    max_streams_per_peer: int = DEFAULT_MAX_STREAMS_PER_PEER
    stream_idle_seconds: float = DEFAULT_STREAM_IDLE_SECONDS
    grace_seconds: float = DEFAULT_GRACE_SECONDS
    poll_seconds: float = DEFAULT_POLL_SECONDS
    max_connection_age_seconds: float = DEFAULT_MAX_CONNECTION_AGE_SECONDS
    require_models: tuple[str, ...] = ()
    tls_cert: Path | None = None
    tls_key: Path | None = None
    auth_token: str | None = None
    engine: EngineConfig = field(default_factory=server_engine_config)

    def __post_init__(self) -> None:
        if self.models_dir is None:
            object.__setattr__(self, "models_dir", default_models_dir())
        object.__setattr__(self, "models_dir", Path(self.models_dir))
        required = self.require_models
        if isinstance(required, str):  # "a,b" as the flag takes it
            required = [name.strip() for name in required.split(",") if name.strip()]
        object.__setattr__(self, "require_models", tuple(dict.fromkeys(required)))
        problems = []
        if not self.metrics_host.strip():
            problems.append("metrics_host must not be empty (127.0.0.1, 0.0.0.0, ::)")
        if not all(isinstance(name, str) and name.strip() for name in self.require_models):
            problems.append(f"require_models must be model names (got {self.require_models!r})")
        if not 0 <= self.port <= 65535 or not 0 <= self.metrics_port <= 65535:
            problems.append(f"ports must be in 0..65535 (got {self.port}, {self.metrics_port})")
        if self.max_message_bytes < 1024 or self.max_message_bytes > 2**31 - 1:
            problems.append("max_message_bytes must be in 1 KiB..2 GiB-1 (protobuf's limit)")
        if self.scoring_threads <= RESERVED_SCORING_THREADS:
            problems.append(
                f"scoring_threads must exceed {RESERVED_SCORING_THREADS} "
                f"(got {self.scoring_threads})"
            )
        if self.max_in_flight < 1 or self.max_queue < 0:
            problems.append("max_in_flight must be >= 1 and max_queue >= 0")
        if not (math.isfinite(self.max_request_gmacs) and self.max_request_gmacs >= 0):
            problems.append(
                f"max_request_gmacs must be finite and >= 0, 0 = per model "
                f"(got {self.max_request_gmacs})"
            )
        if self.memory_limit is not None and self.memory_limit < 64 * 2**20:
            problems.append(f"memory_limit must be at least 64 MiB (got {self.memory_limit})")
        if not (math.isfinite(self.write_timeout_seconds) and self.write_timeout_seconds >= 1):
            problems.append(
                f"write_timeout_seconds must be finite and >= 1 (got {self.write_timeout_seconds})"
            )
        if not (math.isfinite(self.upload_grace_seconds) and self.upload_grace_seconds > 0):
            problems.append(
                f"upload_grace_seconds must be finite and > 0 (got {self.upload_grace_seconds})"
            )
        if self.max_streams < 1 or self.max_streams_per_peer < 1:
            problems.append("max_streams and max_streams_per_peer must be >= 1")
        if not (math.isfinite(self.stream_idle_seconds) and self.stream_idle_seconds > 0):
            problems.append(
                f"stream_idle_seconds must be finite and > 0 (got {self.stream_idle_seconds})"
            )
        seconds = (self.grace_seconds, self.poll_seconds, self.max_connection_age_seconds)
        if not all(math.isfinite(value) and value >= 0 for value in seconds):
            problems.append(
                f"grace, poll and connection-age seconds must be finite and >= 0 (got {seconds})"
            )
        if not isinstance(self.engine, EngineConfig):  # it checked its own fields
            problems.append(f"engine must be an EngineConfig, got {type(self.engine).__name__}")
        if (self.tls_cert is None) != (self.tls_key is None):
            problems.append("TLS needs both a certificate and a key file")
        if self.auth_token is not None and not self.auth_token.strip():
            problems.append("auth_token must not be empty (use None for no auth)")
        elif self.auth_token is not None and not re.fullmatch(r"[\x21-\x7e]+", self.auth_token):
            problems.append(
                "auth_token may hold only visible ASCII characters (no spaces, control or "
                "non-ASCII characters): clients send it in a gRPC header"
            )
        if problems:
            raise InvalidOption("invalid server configuration: " + "; ".join(problems))

    @property
    def max_admitted(self) -> int:
        """Scoring requests admitted (running + queued) over all models at once."""
        return self.scoring_threads - RESERVED_SCORING_THREADS
