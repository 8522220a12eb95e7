"""The gRPC server: densemap.v1, KServe v2, health and reflection on one port.

The server is gRPC's asyncio server (``grpc.aio``) on an event loop of its own thread: a
call holds no thread while its headers, its body or its client's reads are awaited, so no
number of slow or stalled clients can take the threads that score or answer probes.
Health, readiness and metadata calls are answered on the loop; a scoring call takes one
of ``--scoring-threads`` scoring threads once its request is complete and admitted
(``scoring.ScoringCore``).

Life cycle (:class:`DensemapServer`):

1. ``start()`` binds the port and serves at once: ``liveness`` is SERVING, ``readiness``
   and "" are NOT_SERVING, scoring calls get UNAVAILABLE while models load in a thread.
2. Once the repository is loaded: one health name per model SERVING, and readiness and
   "" SERVING only when at least one model is served, and every ``--require-models`` one
   (:mod:`densemap.service.server.readiness`; else NOT_SERVING and one log line says why).
3. ``reload()`` (SIGHUP, ``poll_seconds``) re-reads the repository and re-evaluates
   readiness; a broken new model is logged and never replaces a working one.
4. ``drain()`` (SIGTERM/SIGINT): readiness NOT_SERVING, new calls UNAVAILABLE, idle
   streams end, in-flight calls finish within the grace period; calls still running then
   end with UNAVAILABLE saying the grace ended (at their next pass or tile, within
   ``CUT_SECONDS``; gRPC cancels what is left), and the server stops.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from densemap.service._proto.densemap.v1 import densemap_pb2, densemap_pb2_grpc
from densemap.service.engine import host_memory
from densemap.service.errors import InvalidOption, ModelLoadError
from densemap.service.server import kserve_proto, readiness
from densemap.service.server.auth import BearerTokenInterceptor
from densemap.service.server.compute_limit import ComputeLimit
from densemap.service.server.config import ServerConfig
from densemap.service.server.densemap_servicer import SERVICE_NAME, DensemapServicer, load_failures
from densemap.service.server.device_check import device_problem
from densemap.service.server.idle_memory import IdleRelease
from densemap.service.server.kserve_servicer import KServeServicer
from densemap.service.server.limits import Admission, ServingState
from densemap.service.server.malformed import MalformedRequestInterceptor
from densemap.service.server.memory_budget import MemoryBudget, default_memory_limit
from densemap.service.server.metrics import ServerMetrics
from densemap.service.server.scoring import Models, ScoringCore
from densemap.service.server.status import NotServing
from densemap.service.server.streams import StreamInterceptor, StreamLimits
from densemap.service.server.uploads import Uploads

log = logging.getLogger("densemap.server")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
CUT_SECONDS = 2.0  # after the grace: how long cut calls get to send their own status
LOOP_CALL_SECONDS = 30.0  # longest wait for the event loop to run a life-cycle step
MAX_STREAMS_PER_CONNECTION = 256  # HTTP/2 streams one client connection may open at once
SERVICE_NAMES = (
    SERVICE_NAME,
    kserve_proto.SERVICE_NAME,
    health.SERVICE_NAME,
    reflection.SERVICE_NAME,
)


def open_model_repository(config: ServerConfig):
    """The default repository: ``config.models_dir`` with ``config.engine``."""
    from densemap.service.engine import ModelRepository

    return ModelRepository(config.models_dir, config=config.engine)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class DensemapServer:
    """One server process's gRPC server, model repository, health and metrics."""

    def __init__(
        self, config: ServerConfig, *, open_repository: Callable[[], object] | None = None
    ) -> None:
        self.config = config
        self._open_repository = open_repository or (lambda: open_model_repository(config))
        self.state = ServingState()
        self.models = Models(config.models_dir)
        self.metrics = ServerMetrics()
        self.health = health.aio.HealthServicer()
        self.port = 0
        self.metrics_port = 0
        self._ready_event = threading.Event()  # readiness SERVING
        self._loaded_event = threading.Event()  # the first load finished
        self._readiness_logged: str | None = "loading"  # the last verdict logged
        self._stopped = threading.Event()
        self._reload_lock = threading.Lock()
        self._loop_lock = threading.Lock()  # the loop closes only between health updates
        self._published: set[str] = set()
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(
            target=self._loop.run_forever, name="densemap-grpc", daemon=True
        )
        self._loop_thread.start()
        self._pool = futures.ThreadPoolExecutor(
            max_workers=config.scoring_threads, thread_name_prefix="densemap-score"
        )
        self.memory = MemoryBudget(config.memory_limit or default_memory_limit())
        self.uploads = Uploads(
            self.memory,
            max_message_bytes=config.max_message_bytes,
            grace_seconds=config.upload_grace_seconds,
        )
        self.idle_release = IdleRelease(self._release_memory)
        self.admission = Admission(
            max_in_flight=config.max_in_flight,
            max_queue=config.max_queue,
            max_admitted=config.max_admitted,
            idle=self.idle_release,
        )
        core = ScoringCore(
            models=self.models,
            state=self.state,
            admission=self.admission,
            metrics=self.metrics,
            max_response_bytes=config.max_message_bytes,
            compute=ComputeLimit(config.max_request_gmacs),
            pool=self._pool,
            memory=self.memory,
        )
        self._grpc = self._on_loop(self._build_grpc_server(core))
        for name in ("", "readiness"):
            self._set_health(name, NOT_SERVING)
        self._set_health("liveness", SERVING)

    def _on_loop(self, coroutine: Coroutine, timeout: float | None = LOOP_CALL_SECONDS):
        """Run ``coroutine`` on the server's event loop from another thread; its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def _set_health(self, name: str, status) -> None:
        with self._loop_lock:
            if not self._loop.is_closed():
                self._on_loop(self.health.set(name, status))

    async def _build_grpc_server(self, core: ScoringCore) -> grpc.aio.Server:
        config = self.config
        options = [
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
            # the write timeout: while a call is open, ping its connection; one that does not
            # answer (it reads nothing) is closed, and the responses it pinned are freed
            ("grpc.keepalive_time_ms", int(1000 * config.write_timeout_seconds)),
            ("grpc.keepalive_timeout_ms", int(1000 * config.write_timeout_seconds)),
            ("grpc.http2.max_pings_without_data", 0),
            # a stream whose message is not asked for (its upload has no room yet: uploads.py)
            # may fill its initial flow-control window and no more: 64 KiB with BDP probing
            # off; with it on, grpc raised the window of new streams to 4 MiB (measured)
            ("grpc.http2.bdp_probe", 0),
        ]
        if config.max_connection_age_seconds > 0:
            options.append(
                ("grpc.max_connection_age_ms", int(1000 * config.max_connection_age_seconds))
            )
            options.append(("grpc.max_connection_age_grace_ms", int(1000 * config.grace_seconds)))
        # Outermost first: a call without the token is refused before anything else.
        interceptors = [BearerTokenInterceptor(config.auth_token)] if config.auth_token else []
        self.stream_limits = StreamLimits(
            max_streams=config.max_streams, max_per_peer=config.max_streams_per_peer
        )
        self._streams = StreamInterceptor(
            self.stream_limits,
            idle_seconds=config.stream_idle_seconds,
            stopping=self._stopping_error,
        )
        interceptors.append(self._streams)
        interceptors.append(MalformedRequestInterceptor(self.memory, self.uploads))
        server = grpc.aio.server(interceptors=interceptors, options=options)
        densemap_pb2_grpc.add_DensemapServicer_to_server(DensemapServicer(core), server)
        kserve_proto.add_servicer_to_server(KServeServicer(core), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        pool = kserve_proto.reflection_pool(
            [densemap_pb2.DESCRIPTOR, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR]
        )
        reflection.enable_server_reflection(SERVICE_NAMES, server, pool=pool)
        return server

    def _stopping_error(self) -> NotServing | None:
        """What ends an idle stream early: the server drains."""
        if self.state.draining:
            return NotServing(
                "the server is shutting down: open a new stream on another replica or after "
                "it restarts"
            )
        return None

    # -- life cycle -----------------------------------------------------------------------
    def start(self) -> int:
        """Bind, serve, start loading models in the background; returns the bound port."""
        config = self.config
        if not config.models_dir.is_dir():
            raise ModelLoadError(
                f"model repository {str(config.models_dir)!r} is not a folder: pass --models DIR "
                "(one sub-folder per model)"
            )
        address = _address(config.host, config.port)
        fix = "pick another --port or --host"
        try:
            if config.tls_cert is not None:
                fix += ", and check that --tls-cert and --tls-key are a PEM certificate and its key"
                credentials = grpc.ssl_server_credentials([self._read_tls_pair()])
                self.port = self._grpc.add_secure_port(address, credentials)
            else:
                self.port = self._grpc.add_insecure_port(address)
        except RuntimeError as exc:
            raise InvalidOption(f"cannot listen on {address}: {exc}; {fix}") from None
        if self.port == 0:
            raise InvalidOption(f"cannot listen on {address}: {fix}")
        if config.metrics_port:
            host = config.metrics_host.strip().strip("[]")
            try:
                self.metrics_port = self.metrics.start(host=host, port=config.metrics_port)
            except (OSError, ValueError) as exc:  # ValueError: not an address at all
                raise InvalidOption(
                    f"cannot serve metrics on {_address(host, config.metrics_port)}: "
                    f"{getattr(exc, 'strerror', None) or exc}; pick another --metrics-port "
                    "(0 turns metrics off) or --metrics-host"
                ) from None
        self._on_loop(self._grpc.start())
        tls, auth = config.tls_cert is not None, config.auth_token is not None
        log.info(
            "densemap serving on %s (models %s; TLS %s, auth %s, device %s)",
            _address(config.host, self.port),
            config.models_dir,
            "on" if tls else "off",
            "bearer token" if auth else "off",
            config.engine.device,
            extra={"port": self.port, "host": config.host, "tls": tls, "auth": auth},
        )
        threading.Thread(target=self._load, name="densemap-load", daemon=True).start()
        if config.poll_seconds > 0:
            threading.Thread(target=self._poll, name="densemap-poll", daemon=True).start()
        return self.port

    def _read_tls_pair(self) -> tuple[bytes, bytes]:
        """(key, certificate chain) PEM bytes; a missing or unreadable file is InvalidOption."""
        pair = []
        for flag, path in (
            ("--tls-key", self.config.tls_key),
            ("--tls-cert", self.config.tls_cert),
        ):
            try:
                pair.append(path.read_bytes())
            except OSError as exc:
                raise InvalidOption(
                    f"cannot read {flag} {str(path)!r}: {exc.strerror or exc}; pass a PEM file"
                ) from None
        return pair[0], pair[1]

    def _load(self) -> None:
        problem = device_problem(self.config.engine)
        if problem:  # never ready: a pod on a GPU node must not serve on CPU in silence
            self.state.unusable = problem
            log.error("not ready, and will not become ready: %s", problem)
            return
        with self._reload_lock:
            try:
                repository = self._open_repository()
            except Exception as exc:  # logged; SIGHUP or polling retries
                log.error("cannot load the model repository %s: %s", self.config.models_dir, exc)
                return
            self.models.repository = repository
            self._publish()
            if self.state.draining:
                return
            self.state.set_ready(True)  # loaded: calls are answered from now on
            self._update_readiness()
        self._loaded_event.set()

    def _update_readiness(self) -> None:
        """Readiness after a load or reload (under the reload lock): ready only while at
        least one model, and every --require-models one, is served. Logs each change."""
        names = self.models.names()
        verdict = readiness.evaluate(
            names,
            dict(load_failures(self.models.repository)),
            self.config.require_models,
            f"the model repository {self.config.models_dir}",
        )
        self.state.readiness_problem = verdict.problem
        if self.state.draining:
            return
        status = SERVING if verdict.ready else NOT_SERVING
        for name in ("", "readiness"):
            self._set_health(name, status)
        if self.state.draining:  # a drain began meanwhile: it wins
            for name in ("", "readiness"):
                self._set_health(name, NOT_SERVING)
            return
        if verdict.ready:
            self._ready_event.set()
        else:
            self._ready_event.clear()
        if verdict.problem == self._readiness_logged:
            return  # said already (a poll every few seconds must not repeat it)
        self._readiness_logged = verdict.problem
        if verdict.ready:
            log.info(
                "ready: %d model(s): %s", len(names), ", ".join(names), extra={"models": names}
            )
        else:
            log.error(
                "not ready: %s",
                verdict.problem,
                extra={"models": names, "missing_models": list(verdict.missing)},
            )

    def _publish(self) -> None:
        """Health and metrics per model after a load or reload (the repository logs failures)."""
        self.memory.measure_baseline()  # what the loaded models take, outside the budget
        names = self.models.names()
        status = NOT_SERVING if self.state.draining else SERVING
        for name in names:
            self._set_health(name, status)
        for name in self._published - set(names):
            self._set_health(name, NOT_SERVING)
        self.metrics.set_loaded(names, self._published)
        self._published = set(names)

    def reload(self) -> None:
        """Re-read the repository; broken new models keep their working predecessor."""
        if self.models.repository is None:
            self._load()
            return
        with self._reload_lock:
            try:
                self.models.repository.reload()
            except Exception as exc:
                log.error(
                    "reload of %s failed, keeping the loaded models: %s",
                    self.config.models_dir,
                    exc,
                )
            self._publish()
            self._update_readiness()
        log.info("reloaded: %s", ", ".join(self.models.names()) or "no model")

    def _poll(self) -> None:
        while not self._stopped.wait(self.config.poll_seconds):
            if self.state.draining:
                return
            self.reload()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until the server is ready (serves a model, and every required one)."""
        return self._ready_event.wait(timeout)

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """Wait until the first load of the repository finished, ready or not."""
        return self._loaded_event.wait(timeout)

    def drain(self, grace: float | None = None) -> bool:
        """Stop taking calls, let in-flight ones finish (<= grace s), stop. True if all did."""
        grace = self.config.grace_seconds if grace is None else grace
        for name in ("", "readiness", *self._published):  # probes first, then calls
            self._set_health(name, NOT_SERVING)
        self.state.begin_drain()
        log.info("draining: %d call(s) in flight, grace %.0f s", self.state.active, grace)
        finished = self.state.wait_idle(grace)
        if not finished:
            log.warning(
                "grace period over with %d call(s) in flight: ending them with UNAVAILABLE",
                self.state.active,
            )
            self.state.cut(
                f"the server shut down before this call finished: its drain grace of {grace:g} s "
                "(--grace-seconds) ended; retry the call on another replica or after the "
                "server restarts, or give the server a longer --grace-seconds"
            )
            self.state.wait_idle(CUT_SECONDS)  # queued and running calls see the cut and end
        self.stop(grace=0)
        return finished

    def _release_memory(self) -> None:
        """Idle: shrink the engines' CPU arena (one for the process) and trim the heap."""
        repository = self.models.repository
        engines = [repository.get(name) for name in repository.names] if repository else []
        if engines:
            engines[0].release_memory()
        else:
            host_memory.trim()

    def stop(self, grace: float | None = 0) -> None:
        """Stop serving (calls still running after ``grace`` seconds are cancelled) and
        end the event loop; safe to call more than once, from any thread but the loop's."""
        self.idle_release.stop()
        self._stopped.set()
        self.state.begin_drain()
        wait = None if grace is None else grace + LOOP_CALL_SECONDS
        with self._loop_lock:
            if not self._loop.is_closed():
                self._on_loop(self._grpc.stop(grace), timeout=wait)
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._loop_thread.join(LOOP_CALL_SECONDS)
                self._loop.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.metrics.stop()

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Wait until the server stopped; True when ``timeout`` passed first (as grpc's)."""
        return not self._stopped.wait(timeout) or self._loop_thread.is_alive()

    def __enter__(self) -> DensemapServer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop(grace=0)


def create_server(
    config: ServerConfig, *, open_repository: Callable[[], object] | None = None
) -> tuple[DensemapServer, int]:
    """Build and start a server; returns it and its bound port (models load in background)."""
    server = DensemapServer(config, open_repository=open_repository)
    try:
        return server, server.start()
    except BaseException:
        server.stop()  # its event loop and threads end with it
        raise
