"""``densemap serve``: serve a model repository over gRPC (densemap.v1, KServe v2, health).

Every flag has an environment twin: ``--max-queue`` <-> ``DENSEMAP_MAX_QUEUE``. A flag
given on the command line wins over its variable; both fall back to the documented default.
Signals: SIGTERM/SIGINT drain gracefully (readiness NOT_SERVING, new calls UNAVAILABLE,
in-flight calls finish within --grace-seconds, exit 0; a second signal stops at once);
SIGHUP reloads the repository.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path

from densemap.service.engine.options import (
    AVAILABLE_PRECISIONS,
    DEFAULT_FC_HEAD_UNFOLD,
    DEFAULT_MEMORY_BUDGET,
    DEFAULT_RUNTIME,
    FC_HEAD_UNFOLD_MODES,
    RUNTIMES,
    EngineConfig,
)
from densemap.service.engine.repository import MODELS_HELP
from densemap.service.errors import InvalidOption
from densemap.service.server import config as defaults

log = logging.getLogger("densemap.server")
ENV_PREFIX = "DENSEMAP_"
TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")
MIB = 1024 * 1024


def _env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def _tf32_variable(text: str) -> str | None:
    """DENSEMAP_TF32=1 (before --precision): "tf32"; 0 or empty: not set."""
    return "tf32" if _bool_text(text, "DENSEMAP_TF32") else None


def _bool_text(text: str, name: str) -> bool:
    value = text.strip().lower()
    if value not in TRUE_WORDS + FALSE_WORDS:
        raise SystemExit(f"densemap serve: {name}={value!r} is not a boolean (1/0)")
    return value in TRUE_WORDS


def _env_bool(flag: str) -> bool:
    return _bool_text(os.environ.get(_env_name(flag), ""), _env_name(flag))


class DeprecatedFlag(argparse.Action):
    """An old spelling that still works: stores ``const`` (a switch) or its value into the
    new flag's dest and prints a note naming the new spelling."""

    def __init__(self, option_strings, dest, *, instead: str, **kwargs) -> None:
        self.instead = instead
        kwargs.setdefault("default", argparse.SUPPRESS)  # the new flag's default stands
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        _note(f"{option_string} is deprecated: use {self.instead}")
        setattr(namespace, self.dest, self.const if values is None or values == [] else values)


def _note(text: str) -> None:
    print(f"densemap serve: note: {text}", file=sys.stderr, flush=True)


def _env_default(flag: str, default, *, old: str | None = None, old_value=None):
    """The flag's DENSEMAP_* variable, else its deprecated ``old`` variable (with a note:
    ``old_value`` maps that variable's text to this flag's), else ``default``."""
    env = _env_name(flag)
    if env in os.environ:
        return os.environ[env]
    if old is not None and old in os.environ:
        value = os.environ[old] if old_value is None else old_value(os.environ[old])
        if value is not None:
            _note(f"{old} is deprecated: use {env}")
            return value
    return default


def _add(
    parser,
    flag: str,
    *,
    default,
    help: str,
    aliases: tuple[str, ...] = (),
    shown=None,
    env_alias: dict | None = None,
    **kwargs,
) -> None:
    """A flag whose default comes from its DENSEMAP_* twin, documented in --help."""
    env = _env_name(flag)
    shown = shown or ("off" if default is None else default)
    parser.add_argument(
        flag,
        *aliases,
        default=_env_default(flag, default, **(env_alias or {})),
        help=f"{help} (env {env}; default {shown})",
        **kwargs,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", type=Path, metavar="DIR", help=MODELS_HELP)
    _add(parser, "--host", default=defaults.DEFAULT_HOST, help="address to listen on")
    _add(
        parser,
        "--port",
        default=defaults.DEFAULT_PORT,
        type=int,
        help="gRPC port; 0 picks a free port and logs it",
    )
    _add(
        parser,
        "--metrics-port",
        default=None,
        type=int,
        shown=f"{defaults.DEFAULT_METRICS_PORT}; with --port 0, a free port too (logged)",
        help="Prometheus /metrics port; 0 turns metrics off",
    )
    _add(
        parser,
        "--metrics-host",
        default=defaults.DEFAULT_METRICS_HOST,
        help="address /metrics listens on: plain HTTP without the token, so this host only "
        "by default; 0.0.0.0 lets Prometheus scrape a pod (the shipped Kubernetes manifests "
        "set it)",
    )
    _add(
        parser,
        "--max-message-mb",
        default=defaults.DEFAULT_MAX_MESSAGE_BYTES // MIB,
        type=int,
        help="max gRPC message size received and sent, MiB",
    )
    _add(
        parser,
        "--scoring-threads",
        default=defaults.DEFAULT_SCORING_THREADS,
        type=int,
        env_alias={"old": "DENSEMAP_WORKERS"},
        help="threads that score admitted requests, off the event loop; at most this many - "
        f"{defaults.RESERVED_SCORING_THREADS} scoring calls are admitted at once",
    )
    parser.add_argument(  # the spelling before 0.x; score --workers means other things
        "--workers", dest="scoring_threads", type=int, action=DeprecatedFlag,
        instead="--scoring-threads",
    )  # fmt: skip
    _add(
        parser,
        "--max-in-flight",
        default=defaults.DEFAULT_MAX_IN_FLIGHT,
        type=int,
        help="engine calls running at once per model",
    )
    _add(
        parser,
        "--max-queue",
        default=defaults.DEFAULT_MAX_QUEUE,
        type=int,
        help="requests waiting per model before RESOURCE_EXHAUSTED",
    )
    _add(
        parser,
        "--max-request-gmacs",
        default=defaults.DEFAULT_MAX_REQUEST_GMACS,
        type=float,
        shown="0 = per model: twice one image of --max-pixels at the native stride",
        help="refuse (RESOURCE_EXHAUSTED) a request whose passes would compute more than this "
        "many GMAC (multiply-accumulates, counted from the geometry before it runs)",
    )
    _add(
        parser,
        "--memory-limit",
        default=None,
        metavar="SIZE",
        shown="the cgroup limit (a pod's) when there is one, else the machine's memory",
        help="memory for the whole server (bytes, or 6G, 512M): scoring calls reserve their "
        "request, maps and response within it, less 20%% headroom and the loaded models; "
        "beyond, RESOURCE_EXHAUSTED",
    )
    _add(
        parser,
        "--upload-grace-seconds",
        default=defaults.DEFAULT_UPLOAD_GRACE_SECONDS,
        type=float,
        help="a request is received only once memory for the largest request is reserved; "
        "one still arriving N seconds later is ended (RESOURCE_EXHAUSTED) when another call "
        "needs that memory",
    )
    _add(
        parser,
        "--write-timeout-seconds",
        default=defaults.DEFAULT_WRITE_TIMEOUT_SECONDS,
        type=float,
        help="close a client connection that reads nothing (no keepalive ping answered) for "
        "N seconds while a call is open, freeing the responses it pinned",
    )
    _add(
        parser,
        "--max-streams",
        default=defaults.DEFAULT_MAX_STREAMS,
        type=int,
        help="open streams (ScoreStream, health Watch, reflection) at once, on threads of "
        "their own",
    )
    _add(
        parser,
        "--max-streams-per-peer",
        default=defaults.DEFAULT_MAX_STREAMS_PER_PEER,
        type=int,
        help="open streams from one client address",
    )
    _add(
        parser,
        "--stream-idle-seconds",
        default=defaults.DEFAULT_STREAM_IDLE_SECONDS,
        type=float,
        help="close a stream whose client sends nothing for N seconds",
    )
    _add(
        parser,
        "--grace-seconds",
        default=defaults.DEFAULT_GRACE_SECONDS,
        type=float,
        aliases=("--grace",),
        help="drain time for in-flight calls on SIGTERM/SIGINT",
    )
    _add(
        parser,
        "--poll-seconds",
        default=defaults.DEFAULT_POLL_SECONDS,
        type=float,
        help="reload the repository every N seconds; 0: only on SIGHUP",
    )
    _add(
        parser,
        "--max-connection-age-seconds",
        type=float,
        default=defaults.DEFAULT_MAX_CONNECTION_AGE_SECONDS,
        help="close client connections after N seconds so clients rebalance; 0: never",
    )
    _add(
        parser,
        "--require-models",
        default="",
        metavar="NAME,...",
        shown="none: ready once any model is served",
        help='ready only while every one of these models is served (readiness, health "" '
        "and KServe ServerReady say NOT_SERVING otherwise, and the log says which is missing); "
        "at least one model must be served in any case",
    )
    _add(parser, "--tls-cert", default=None, type=Path, metavar="PEM", help="TLS certificate")
    _add(parser, "--tls-key", default=None, type=Path, metavar="PEM", help="TLS private key")
    _add(
        parser,
        "--auth-token",
        default=None,
        metavar="TOKEN",
        help="require 'authorization: Bearer TOKEN' (health and reflection stay open); "
        "prefer the env variable, command lines are visible to other users",
    )
    _add(
        parser,
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="onnxruntime device: auto (CUDA when it really loads, else CPU), cuda (a "
        "server that cannot use CUDA never becomes ready and logs which driver it needs), "
        "or cpu",
    )
    _add(parser, "--threads", default=0, type=int, help="onnxruntime intra-op threads; 0: auto")
    _add(
        parser,
        "--max-pixels",
        default=None,
        type=int,
        shown=f"memory budget / {defaults.SERVER_BYTES_PER_PIXEL}, "
        f"{defaults.server_max_pixels(DEFAULT_MEMORY_BUDGET)} at the default budget",
        help="refuse images with more pixels, from their header",
    )
    _add(
        parser,
        "--memory-budget",
        default=None,
        metavar="SIZE",
        shown=f"{DEFAULT_MEMORY_BUDGET >> 30}G on CPU, half the free GPU memory on CUDA",
        help="memory one request may use (its maps and copies, plus one pass's activations, which are tiled to fit): bytes, or 512M, 2G",
    )
    _add(
        parser,
        "--precision",
        default="fp32",
        choices=AVAILABLE_PRECISIONS,
        env_alias={"old": "DENSEMAP_TF32", "old_value": _tf32_variable},
        help="default precision of requests that choose none (a model's densemap.json and "
        "each request may choose another): fp32 is exact, tf32 and fp16 are faster on GPUs, "
        "int8 on CPUs (every model then needs int8 copies: convert --int8-calibration)",
    )
    _add(
        parser,
        "--cuda-conv-search",
        default="HEURISTIC",
        choices=("HEURISTIC", "EXHAUSTIVE", "DEFAULT"),
        help="cuDNN convolution algorithm search: HEURISTIC (default) is cheap for every new "
        "image shape; EXHAUSTIVE times every algorithm once per shape (about 12%% faster "
        "steady state on VGG-16, 3-9x slower first requests: list warm-up shapes in the "
        "model's densemap.json); DEFAULT does no search",
    )
    _add(
        parser,
        "--runtime",
        default=DEFAULT_RUNTIME,
        choices=RUNTIMES,
        help="what runs the dense nets: ort (onnxruntime) or torch (cuDNN with per-shape "
        "search, channels-last fp16 on GPUs; needs pip install 'densemap[torch]'); a model's "
        "densemap.json may choose its own",
    )
    _add(
        parser,
        "--fc-head-unfold",
        default=DEFAULT_FC_HEAD_UNFOLD,
        choices=FC_HEAD_UNFOLD_MODES,
        env_alias={"old": "DENSEMAP_HEAD_UNFOLD"},
        help="run the huge-kernel convs of a classifier's rewritten FC head (FC6 as a 7x7 "
        "conv) as unfold + MatMul, which needs no cuDNN workspace (tens of GB for VGG-16 "
        "at 2048²): on cuda sessions, always or never",
    )
    parser.add_argument(  # "head" alone names a model's outputs (--heads of score)
        "--head-unfold", dest="fc_head_unfold", choices=FC_HEAD_UNFOLD_MODES,
        action=DeprecatedFlag, instead="--fc-head-unfold",
    )  # fmt: skip
    parser.add_argument(
        "--no-tiling",
        action="store_true",
        default=_env_bool("--no-tiling"),
        help="refuse images over the memory budget instead of tiling "
        f"(env {_env_name('--no-tiling')}=1)",
    )
    parser.add_argument(  # tf32 is one precision: --precision tf32
        "--tf32", dest="precision", nargs=0, const="tf32", action=DeprecatedFlag,
        instead="--precision tf32",
    )  # fmt: skip
    parser.add_argument(
        "--log-json",
        action="store_true",
        default=_env_bool("--log-json"),
        help="log JSON lines only: Python warnings and C libraries' stderr become rate-limited "
        f"records (env {_env_name('--log-json')}=1)",
    )
    _add(parser, "--log-level", default="info", choices=("debug", "info", "warning", "error"),
         help="log level; debug logs one line per request")  # fmt: skip


def _configure_logging(args: argparse.Namespace) -> None:
    from densemap.service.server import log_stream

    level = (
        logging.DEBUG if getattr(args, "debug", False) else getattr(logging, args.log_level.upper())
    )
    log_stream.configure(json_lines=args.log_json, level=level)


def _metrics_port(args: argparse.Namespace) -> int:
    """--metrics-port, else 9090; with --port 0 (several servers on one host, tests) a free
    port, so the second server does not fail on 9090."""
    if args.metrics_port is not None:
        return args.metrics_port
    if args.port != 0:
        return defaults.DEFAULT_METRICS_PORT
    host = args.metrics_host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host.strip("[]"), 0))
            return probe.getsockname()[1]
    except OSError:  # a bad --metrics-host fails at start-up with the flag's name
        return defaults.DEFAULT_METRICS_PORT


def _auth_token(given: str | None) -> str | None:
    """--auth-token / DENSEMAP_AUTH_TOKEN without the newline a Secret made from a file
    carries; set but blank is an error, never a server without auth."""
    if given is None:
        return None
    if not given.strip():
        raise InvalidOption(
            f"--auth-token ({_env_name('--auth-token')}) is set but empty: give the token, or "
            "unset it to serve without auth"
        )
    return given.strip()


def build_config(args: argparse.Namespace):
    from densemap.service.score_cli import parse_bytes
    from densemap.service.server.config import ServerConfig

    budget = None if args.memory_budget is None else parse_bytes(args.memory_budget)
    return ServerConfig(
        models_dir=args.models,
        host=args.host,
        port=args.port,
        metrics_port=_metrics_port(args),
        metrics_host=args.metrics_host,
        require_models=args.require_models,
        max_message_bytes=args.max_message_mb * MIB,
        scoring_threads=args.scoring_threads,
        max_in_flight=args.max_in_flight,
        max_queue=args.max_queue,
        max_request_gmacs=args.max_request_gmacs,
        memory_limit=None
        if args.memory_limit is None
        else parse_bytes(args.memory_limit, "--memory-limit"),
        upload_grace_seconds=args.upload_grace_seconds,
        write_timeout_seconds=args.write_timeout_seconds,
        max_streams=args.max_streams,
        max_streams_per_peer=args.max_streams_per_peer,
        stream_idle_seconds=args.stream_idle_seconds,
        grace_seconds=args.grace_seconds,
        poll_seconds=args.poll_seconds,
        max_connection_age_seconds=args.max_connection_age_seconds,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        auth_token=_auth_token(args.auth_token),
        engine=EngineConfig(
            device=args.device,
            intra_op_threads=args.threads,
            max_pixels=args.max_pixels
            if args.max_pixels is not None
            else defaults.server_max_pixels(budget or DEFAULT_MEMORY_BUDGET),
            memory_budget=budget,
            tiling=not args.no_tiling,
            precision=args.precision,
            cuda_conv_search=args.cuda_conv_search,
            runtime=args.runtime,
            fc_head_unfold=args.fc_head_unfold,
        ),
    )


def run(args: argparse.Namespace) -> int:
    _configure_logging(args)
    from densemap.service.engine import host_memory
    from densemap.service.engine.onnxruntime_package import import_onnxruntime
    from densemap.service.server.app import create_server

    import_onnxruntime()  # none installed, or two: exit 2 with the fix, before serving

    host_memory.limit_arenas()  # before any server thread allocates: bounded idle memory

    config = build_config(args)
    stop = threading.Event()
    server_box: list = []

    def on_stop(signum, _frame) -> None:
        if stop.is_set() and server_box:  # a second signal: no more grace
            log.warning("second %s: stopping now", signal.Signals(signum).name)
            threading.Thread(target=server_box[0].stop, args=(0,), daemon=True).start()
        stop.set()

    def on_reload(_signum, _frame) -> None:
        if server_box:
            threading.Thread(target=server_box[0].reload, name="densemap-reload").start()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, on_reload)
    server, _port = create_server(config)
    server_box.append(server)
    while not stop.wait(1.0):
        pass
    log.info("shutdown requested: draining (grace %.0f s)", config.grace_seconds)
    finished = server.drain()
    log.info("stopped%s", "" if finished else " (some calls were cut at the end of the grace)")
    return 0
