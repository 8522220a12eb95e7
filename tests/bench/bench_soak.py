"""Benchmark: a bounded soak, and the resident memory a server keeps after it.

Run: ``make soak`` or ``.venv/bin/python tests/bench/bench_soak.py`` (or ``pytest <file> -s``).
``DENSEMAP_SOAK_CLIENTS`` clients (default 8) send mixed requests for ``DENSEMAP_SOAK_SECONDS``
(default 45) to a ``densemap serve`` process on 127.0.0.1 serving the mini-VGG of
``bench_engine_common``: densemap.v1 PNG bytes and KServe raw uint8, 256² to 2048², native
stride and stride 4, plus the issue's costly request (refused from its header). A separate
probe process sends readiness ``Check`` calls meanwhile. Per allocator setting it reports
requests, codes, p50/p99 latency, RSS after the first request, peak RSS (VmHWM), idle RSS
10 s after the soak (read from /metrics' ``process_resident_memory_bytes``) and health p99.

Settings compared, each in a fresh server: ``no trim`` (onnxruntime's arena shrunk, glibc's
heap and arenas left as they are), ``trim`` with glibc's arenas, the default (trim, and
``densemap serve`` caps glibc at 2 arenas with ``mallopt``), and the cap set through
``MALLOC_ARENA_MAX=2`` instead. Target: idle RSS <= 2x the RSS after the first request.
"""

from __future__ import annotations

import collections
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton
import tritonclient.utils as triton_utils
from bench_engine_common import THREADS, dense_model, machine, print_table
from PIL import Image

from densemap.service.client import DensemapClient, RemoteError

CLIENTS = int(os.environ.get("DENSEMAP_SOAK_CLIENTS", "8"))
SECONDS = float(os.environ.get("DENSEMAP_SOAK_SECONDS", "45"))
IDLE_SECONDS = 10.0
SIDES = (256, 512, 1024, 2048)
NO_TRIM = (
    "import densemap.service.engine.host_memory as m; m.trim = lambda: False; "
    "m.limit_arenas = lambda *a: False; "
)
GLIBC_ARENAS = (
    "import densemap.service.engine.host_memory as m; m.limit_arenas = lambda *a: False; "
)
SETTINGS = {  # name: (python -c prefix, extra environment)
    "no trim (glibc arenas)": (NO_TRIM, {}),
    "trim (glibc arenas)": (GLIBC_ARENAS, {}),
    "trim + 2 arenas via mallopt (default)": ("", {}),
    "trim + MALLOC_ARENA_MAX=2 (environment)": ("", {"MALLOC_ARENA_MAX": "2"}),
}


def start(
    models_dir, prefix: str, env: dict, extra: tuple[str, ...] = ()
) -> tuple[subprocess.Popen, int, int]:
    """(process, gRPC port, metrics port) of a ready ``densemap serve`` (``extra`` flags)."""
    code = prefix + "from densemap.service.cli import main; sys.exit(main())"
    command = [sys.executable, "-c", "import sys; " + code, "serve", "--log-json"]
    with socket.socket() as sock:  # --metrics-port 0 turns metrics off: pick a free port
        sock.bind(("127.0.0.1", 0))
        metrics_port = sock.getsockname()[1]
    command += ["--host", "127.0.0.1", "--port", "0", "--metrics-port", str(metrics_port)]
    command += ["--models", str(models_dir), "--threads", str(THREADS), *extra]
    environment = {**os.environ, **env}
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=environment
    )
    ports: dict[str, int] = {}
    deadline = time.monotonic() + 120
    for line in process.stderr:
        record = json.loads(line) if line.startswith("{") else {}
        if "port" in record:
            ports["port"] = record["port"]
        if record.get("message", "").startswith("ready"):
            break
        if time.monotonic() > deadline:
            raise RuntimeError("densemap serve did not become ready in 120 s")
    threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()
    return process, ports["port"], metrics_port


def log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def rss(metrics_port: int) -> float:
    """The server's RSS in MiB, from its own /metrics."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    for line in urllib.request.urlopen(url, timeout=10).read().decode().splitlines():
        if line.startswith("process_resident_memory_bytes "):
            return float(line.split()[1]) / 2**20
    raise RuntimeError("no process_resident_memory_bytes in /metrics")


def peak_rss(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def png(side: int, seed: int) -> bytes:
    image = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def client_loop(target, model, index, stop, codes, latencies) -> None:
    rng = np.random.default_rng(index)
    images = {side: png(side, side + index) for side in SIDES}
    costly = png(64, index)
    with DensemapClient(target, timeout=300) as client, triton.InferenceServerClient(target) as tc:
        while not stop.is_set():
            side = int(rng.choice(SIDES, p=(0.4, 0.3, 0.2, 0.1)))
            kind = rng.integers(0, 5)
            start = time.perf_counter()
            try:
                if kind == 0:
                    client.score(costly, model=model, output_stride=1, scales=[31.25] * 4)
                elif kind in (1, 2):
                    stride = 4 if side <= 512 and kind == 2 else None
                    client.score(images[side], model=model, output_stride=stride, top_k=2)
                else:
                    pixels = np.random.default_rng(side).integers(0, 256, (side, side, 3))
                    tensor = triton.InferInput("image", [side, side, 3], "UINT8")
                    tensor.set_data_from_numpy(pixels.astype(np.uint8))
                    tc.infer(model, [tensor], client_timeout=300)
                codes["OK"] += 1
            except RemoteError as exc:
                refused = kind == 0 and exc.code.name == "RESOURCE_EXHAUSTED"
                codes["costly refused" if refused else exc.code.name] += 1
            except triton_utils.InferenceServerException as exc:
                codes[str(exc.status()).replace("StatusCode.", "")] += 1
            latencies.append(time.perf_counter() - start)


def models_dir(model_path) -> Path:
    """A repository holding only ``model_path``'s model (the bench folder holds others)."""
    root = model_path.parent.parent / "soak-models"
    target = root / model_path.parent.name
    if not target.is_dir():
        shutil.copytree(model_path.parent, target)
    return root


def soak(model_path, name: str) -> list:
    prefix, env = SETTINGS[name]
    process, port, metrics_port = start(models_dir(model_path), prefix, env)
    log(f"{name}: serving on {port}")
    target, model = f"127.0.0.1:{port}", model_path.parent.name
    try:
        fresh = rss(metrics_port)
        with DensemapClient(target, timeout=120) as client:
            client.score(png(512, 0), model=model)
        first = rss(metrics_port)
        log(f"{name}: fresh {fresh:.0f} MiB, after the first request {first:.0f} MiB")
        stop, codes, latencies = threading.Event(), collections.Counter(), []
        threads = [
            threading.Thread(target=client_loop, args=(target, model, i, stop, codes, latencies))
            for i in range(CLIENTS)
        ]
        for thread in threads:
            thread.start()
        probe = subprocess.run(
            [sys.executable, os.path.join(os.path.dirname(__file__), "bench_health.py")]
            + ["--probe", target, str(SECONDS)],
            capture_output=True,
            text=True,
            timeout=SECONDS + 120,
            check=True,
        )
        stop.set()
        for thread in threads:
            thread.join(600)
        peak = peak_rss(process.pid)
        log(f"{name}: {len(latencies)} requests {dict(codes)}, peak {peak:.0f} MiB")
        time.sleep(IDLE_SECONDS)
        idle = rss(metrics_port)
    finally:
        process.terminate()
        process.wait(60)
    checks = np.array(json.loads(probe.stdout.splitlines()[-1]))
    ms = 1000 * np.array(latencies)
    return [name, len(latencies), dict(codes), float(np.percentile(ms, 50)),
            float(np.percentile(ms, 99)), fresh, first, peak, idle, idle / first,
            float(np.percentile(1000 * checks[np.isfinite(checks)], 99))]  # fmt: skip


def test_soak_idle_memory():
    model_path = dense_model("mini_vgg")
    names = os.environ.get("DENSEMAP_SOAK_SETTINGS")
    rows = [soak(model_path, name) for name in (names.split(",") if names else SETTINGS)]
    print(f"\nmachine: {machine()}; load average {os.getloadavg()[0]:.1f}")
    print_table(
        f"soak: {CLIENTS} clients, {SECONDS:g} s, mixed sizes and APIs; idle = {IDLE_SECONDS:g} s after",
        ["setting", "requests", "codes", "p50 ms", "p99 ms", "fresh MiB", "first MiB",
         "peak MiB", "idle MiB", "idle/first", "health p99 ms"],
        rows,
    )  # fmt: skip
    assert all(row[1] > 0 for row in rows)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    test_soak_idle_memory()
