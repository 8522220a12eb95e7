"""Benchmark: p99 latency of a readiness ``Check`` while the server is fully loaded.

Run: ``.venv/bin/python tests/bench/bench_health.py`` (or ``pytest <file> -s``).
A ``densemap serve`` process on 127.0.0.1 serves the mini-VGG of ``bench_engine_common``;
``CLIENTS`` threads send 1024² scoring calls (densemap.v1 and KServe, raw uint8) back to back
for ``SECONDS``, so every scoring slot is taken and more calls are refused; a separate probe
process (as a kubelet is) sends a readiness ``Check`` every 50 ms with a 5 s timeout.
Kubernetes' default probe timeout is 1 s; the target here is a p99 of at most 0.5 s.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import tritonclient.grpc as triton
import tritonclient.utils as triton_utils
from bench_engine_common import dense_model, machine, print_table
from bench_server import start_server

from densemap.service.client import DensemapClient, RemoteError

CLIENTS = int(os.environ.get("DENSEMAP_BENCH_CLIENTS", "32"))
SECONDS = float(os.environ.get("DENSEMAP_BENCH_SECONDS", "20"))
SIDE = 1024
PROBE_EVERY = 0.05


def probe(target: str, seconds: float) -> None:
    """Probe process: print the latencies (s) of readiness checks as one JSON list."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    latencies = []
    with grpc.insecure_channel(target) as chan:
        stub = health_pb2_grpc.HealthStub(chan)
        request = health_pb2.HealthCheckRequest(service="readiness")
        stub.Check(request, timeout=10)  # connect first
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            start = time.perf_counter()
            try:
                stub.Check(request, timeout=5)
                latencies.append(time.perf_counter() - start)
            except grpc.RpcError:
                latencies.append(float("inf"))
            time.sleep(PROBE_EVERY)
    print(json.dumps(latencies))


def load(target: str, model: str, stop: threading.Event, codes: collections.Counter) -> None:
    image = np.random.default_rng(0).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    tensor = triton.InferInput("image", list(image.shape), "UINT8")
    tensor.set_data_from_numpy(image)
    with DensemapClient(target, timeout=120) as client, triton.InferenceServerClient(target) as tc:
        turn = 0
        while not stop.is_set():
            turn += 1
            try:
                if turn % 2:
                    client.score(image, model=model)
                else:
                    tc.infer(model, [tensor], client_timeout=120)
                codes["OK"] += 1
            except RemoteError as exc:
                codes[exc.code.name] += 1
            except triton_utils.InferenceServerException as exc:
                codes[str(exc.status()).replace("StatusCode.", "")] += 1


def test_health_check_p99_under_full_load():
    model_path = dense_model("mini_vgg")
    process, port = start_server(model_path.parent.parent)
    target = f"127.0.0.1:{port}"
    stop, codes = threading.Event(), collections.Counter()
    try:
        clients = [
            threading.Thread(target=load, args=(target, model_path.parent.name, stop, codes))
            for _ in range(CLIENTS)
        ]
        for client in clients:
            client.start()
        time.sleep(2)  # let the load build up
        probe_process = subprocess.run(
            [sys.executable, __file__, "--probe", target, str(SECONDS)],
            capture_output=True,
            text=True,
            timeout=SECONDS + 120,
            check=True,
        )
        stop.set()
        for client in clients:
            client.join(180)
    finally:
        stop.set()
        process.terminate()
        process.wait(60)
    latencies = np.array(json.loads(probe_process.stdout.splitlines()[-1]))
    ms = 1000 * latencies[np.isfinite(latencies)]
    print(f"\nmachine: {machine()}; load average {os.getloadavg()[0]:.1f}")
    print_table(
        f"readiness Check under load: {CLIENTS} clients of {SIDE}² scoring calls, {SECONDS:g} s",
        ["checks", "failed", "p50 ms", "p99 ms", "max ms", "scoring calls by code"],
        [[len(latencies), int((~np.isfinite(latencies)).sum()), float(np.percentile(ms, 50)),
          float(np.percentile(ms, 99)), float(ms.max()), dict(codes)]],
    )  # fmt: skip
    assert len(ms) > 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--probe"]:
        probe(sys.argv[2], float(sys.argv[3]))
    else:
        os.environ.setdefault("PYTHONUNBUFFERED", "1")
        test_health_check_p99_under_full_load()
