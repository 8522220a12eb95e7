"""Benchmark: gRPC end-to-end vs an in-process engine call, and 8 concurrent clients vs 1.

Run: ``.venv/bin/python tests/bench/bench_server.py`` (or ``pytest <file> -s``).
The server runs as a separate ``densemap serve`` process on 127.0.0.1 (port 0), serving the
mini-VGG of ``bench_engine_common`` (64x64 window, stride 8, 10 classes), with the same
onnxruntime thread count as the in-process engine.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import os
import subprocess
import sys
import time

import numpy as np
import tritonclient.grpc as triton
from bench_engine_common import THREADS, dense_model, machine, print_table
from PIL import Image

from densemap.service.client import DensemapClient
from densemap.service.engine import Engine, EngineConfig

SIZES = (512, 2048)
REPEAT = {512: 15, 2048: 4}
SMALL = 128  # image side for the concurrency benchmark
CONCURRENT_CALLS = 64  # requests per concurrency level


def start_server(models_dir) -> tuple[subprocess.Popen, int]:
    command = [
        sys.executable,
        "-m",
        "densemap.service.cli",
        "serve",
        "--log-json",
        "--host",
        "127.0.0.1",
    ]
    command += ["--port", "0", "--metrics-port", "0", "--models", str(models_dir)]
    command += ["--threads", str(THREADS), "--max-in-flight", "2"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    port = None
    deadline = time.monotonic() + 120
    for line in process.stderr:  # bounded by the deadline check and the process's end
        record = json.loads(line) if line.startswith("{") else {}
        port = record.get("port", port)
        if record.get("message", "").startswith("ready"):
            break
        if time.monotonic() > deadline:
            raise RuntimeError("densemap serve did not become ready in 120 s")
    if port is None:
        raise RuntimeError("densemap serve did not log its port")
    return process, port


def interleaved_medians(functions: dict, repeat: int) -> dict[str, tuple[float, float]]:
    """Per function: median wall seconds, and median seconds spent outside the server's
    handler (wall minus the server's own total_ms of the same call: serialization and
    transport). Functions are timed in turn after one warm-up each, so that load changes on
    a shared machine hit all of them alike; each returns its server-side seconds (or 0)."""
    for function in functions.values():
        function()
    walls: dict[str, list[float]] = {name: [] for name in functions}
    outside: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeat):
        for name, function in functions.items():
            start = time.perf_counter()
            server_seconds = function()
            wall = time.perf_counter() - start
            walls[name].append(wall)
            outside[name].append(wall - server_seconds if server_seconds else 0.0)
    return {
        name: (float(np.median(walls[name])), float(np.median(outside[name]))) for name in walls
    }


def triton_call(client, model: str, image: np.ndarray | bytes):
    if isinstance(image, bytes):
        tensor = triton.InferInput("image_bytes", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([image], dtype=np.object_))
    else:
        tensor = triton.InferInput("image", list(image.shape), "UINT8")
        tensor.set_data_from_numpy(image)

    def call() -> float:
        result = client.infer(model, [tensor], client_timeout=600)
        result.as_numpy("scores")
        return result.get_response().parameters["total_ms"].double_param / 1000

    return call


def in_process(engine: Engine, image) -> float:
    engine.score(image)
    return 0.0  # no server involved


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def bench_latency(engine: Engine, target: str, model: str) -> list[list]:
    rows = []
    rng = np.random.default_rng(0)
    with DensemapClient(target, timeout=600) as client, triton.InferenceServerClient(target) as tc:
        for size in SIZES:
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            pixels = np.ascontiguousarray(np.sort(pixels, axis=1))  # smooth: PNG compresses
            for kind, image in (("raw uint8", pixels), ("PNG", png_bytes(pixels))):
                medians = interleaved_medians(
                    {
                        "local": lambda image=image: in_process(engine, image),
                        "densemap": lambda image=image: client.score(image, model=model).timings[
                            "total"
                        ],
                        "kserve": triton_call(tc, model, image),
                    },
                    REPEAT[size],
                )
                (local, _), (remote, remote_out), (kserve, kserve_out) = medians.values()
                result = client.score(image, model=model)
                size_mb = (image.nbytes if kind == "raw uint8" else len(image)) / 1e6
                rows.append(
                    [f"{size}^2 {kind}", size_mb, result.maps[0].scores.nbytes / 1e6,
                     1000 * local, 1000 * remote, 100 * (remote / local - 1),
                     1000 * remote_out, 100 * remote_out / local,
                     1000 * kserve, 100 * (kserve / local - 1),
                     1000 * kserve_out, 100 * kserve_out / local]
                )  # fmt: skip
    return rows


def bench_concurrency(target: str, model: str) -> list[list]:
    image = np.random.default_rng(1).integers(0, 256, (SMALL, SMALL, 3), dtype=np.uint8)
    rows, base = [], None
    for clients in (1, 8):
        channels = [DensemapClient(target, timeout=600) for _ in range(clients)]
        try:
            for channel in channels:
                channel.score(image, model=model)  # connect and warm up
            calls = [channels[i % clients] for i in range(CONCURRENT_CALLS)]
            start = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(clients) as pool:
                list(pool.map(lambda c: c.score(image, model=model), calls))
            elapsed = time.perf_counter() - start
        finally:
            for channel in channels:
                channel.close()
        throughput = CONCURRENT_CALLS / elapsed
        base = base or throughput
        rows.append([clients, CONCURRENT_CALLS, elapsed, throughput, throughput / base])
    return rows


def test_server_overhead_and_concurrency():
    model_path = dense_model("mini_vgg")
    engine = Engine(model_path, config=EngineConfig(intra_op_threads=THREADS))
    process, port = start_server(model_path.parent.parent)
    target = f"127.0.0.1:{port}"
    try:
        model = model_path.parent.name
        latency = bench_latency(engine, target, model)
        concurrency = bench_concurrency(target, model)
    finally:
        process.terminate()
        process.wait(60)
    load = os.getloadavg()[0]
    print(f"\nmachine: {machine()}; load average {load:.1f}; server: densemap serve on 127.0.0.1")
    print_table(
        "End-to-end (gRPC, median) vs in-process Engine.score on the same input, mini-VGG",
        ["image", "input MB", "map MB", "in-process ms",
         "densemap.v1 ms", "vs in-process %", "outside server ms", "of in-process %",
         "tritonclient ms", "vs in-process %", "outside server ms", "of in-process %"],
        latency,
    )  # fmt: skip
    print_table(
        f"Throughput, {SMALL}x{SMALL} images, {CONCURRENT_CALLS} requests",
        ["clients", "requests", "seconds", "requests/s", "ratio vs 1 client"],
        concurrency,
    )
    assert all(row[4] > 0 for row in latency)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    test_server_overhead_and_concurrency()
