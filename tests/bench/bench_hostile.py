"""Benchmark: a hostile mix of clients, against a ``densemap serve`` process.

Run: ``make soak`` (after the soak) or ``.venv/bin/python tests/bench/bench_hostile.py``.
The server serves the tests' TINY model (cheap passes: the figures measure the server, not
the net) on 127.0.0.1 with ``--memory-limit $DENSEMAP_HOSTILE_MEMORY_LIMIT`` (default 4G).

1. Held calls: 64 headers-only calls (16 health ``Check``, 32 ``Score``, 16 ``ModelInfer``)
   and 40 calls dripping their body at 20 B/s stay open for ``DENSEMAP_HOSTILE_SECONDS``
   (default 20) while a probe process sends readiness ``Check`` every 50 ms (5 s timeout)
   and a client scores 512² PNGs back to back: health p99, failed checks, scoring calls.
2. Memory: 8 concurrent raw 8000² ``Score`` calls (192 MB requests); then 6 clients that
   never read their ~80 MB responses (raw HTTP/2, flow control never granted) and the 8
   calls again: peak RSS (VmHWM, reset between the two) against the limit, and what each
   call got.
3. Costly requests: seconds from sending to the status of the issue's costly requests
   (scales=[120]*16 at stride 1 on a 64² PNG; 30 M scales; a KServe scales string of 40 M
   entries; 64 M uint_contents).
"""

from __future__ import annotations

import collections
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
from bench_engine_common import BENCH_DIR, machine, print_table
from bench_soak import log, peak_rss, start
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests.support.*
from densemap.service._proto.densemap.v1 import densemap_pb2 as pb  # noqa: E402
from densemap.service._proto.densemap.v1 import densemap_pb2_grpc as pb_grpc  # noqa: E402
from densemap.service.score_cli import parse_bytes  # noqa: E402
from tests.support.hostile_clients import StalledCalls, UnreadCall  # noqa: E402
from tests.support.server_harness import TINY, build_repository  # noqa: E402

HOST = "127.0.0.1"
LIMIT = os.environ.get("DENSEMAP_HOSTILE_MEMORY_LIMIT", "4G")
SECONDS = float(os.environ.get("DENSEMAP_HOSTILE_SECONDS", "20"))
BIG_SIDE = 8000
CHECK = "/grpc.health.v1.Health/Check"
SCORE = "/densemap.v1.Densemap/Score"
INFER = "/inference.GRPCInferenceService/ModelInfer"
MESSAGE_BYTES = 256 << 20


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def channel(target: str) -> grpc.Channel:
    options = [
        ("grpc.max_send_message_length", MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MESSAGE_BYTES),
    ]
    return grpc.insecure_channel(target, options=options)


def outcome(call) -> str:
    try:
        call()
        return "OK"
    except grpc.RpcError as exc:
        return exc.code().name


def held_calls(target: str, port: int) -> list:
    stalled = [StalledCalls(HOST, port, CHECK, 16)]
    stalled += [StalledCalls(HOST, port, SCORE, 16) for _ in range(2)]
    stalled += [StalledCalls(HOST, port, INFER, 16)]
    stalled += [StalledCalls(HOST, port, path, 10, drip=0.05) for path in (SCORE, INFER) * 2]
    stop, codes = threading.Event(), collections.Counter()
    request = pb.ScoreRequest(model=TINY, image={"encoded": png(rng_image(512, 512))})

    def score_loop() -> None:
        with channel(target) as chan:
            stub = pb_grpc.DensemapStub(chan)
            while not stop.is_set():
                code = outcome(lambda: stub.Score(request, timeout=30))
                codes[code] += 1
                if code != "OK":
                    stop.wait(0.05)  # a client's backoff

    scorer = threading.Thread(target=score_loop)
    scorer.start()
    try:
        probe = subprocess.run(
            [sys.executable, str(Path(__file__).with_name("bench_health.py"))]
            + ["--probe", target, str(SECONDS)],
            capture_output=True,
            text=True,
            timeout=SECONDS + 120,
            check=True,
        )
        still_open = sum(len(calls.streams) - calls.ended() for calls in stalled)
    finally:
        stop.set()
        scorer.join(120)
        for calls in stalled:
            calls.close()
    checks = 1000 * np.array(json.loads(probe.stdout.splitlines()[-1]))
    finite = checks[np.isfinite(checks)]
    return [
        "64 headers-only + 40 dripping calls",
        f"{still_open} held",
        f"health p99 {np.percentile(finite, 99):.1f} ms, {int((~np.isfinite(checks)).sum())} "
        f"failed of {len(checks)}; scoring {dict(codes)}",
    ]


def rng_image(height: int, width: int) -> np.ndarray:
    return np.random.default_rng(height).integers(0, 256, (height, width, 3), dtype=np.uint8)


def reset_peak(pid: int) -> None:
    """Reset the process's VmHWM to its RSS now (Linux: 5 > clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def big_calls(target: str) -> collections.Counter:
    """8 concurrent raw 8000² Score calls: what each got."""
    big = pb.ScoreRequest(model=TINY)
    big.image.array.dtype = pb.UINT8
    big.image.array.shape[:] = [BIG_SIDE, BIG_SIDE, 3]
    big.image.array.data = rng_image(BIG_SIDE, BIG_SIDE).tobytes()
    codes = collections.Counter()
    with channel(target) as chan:
        stub = pb_grpc.DensemapStub(chan)
        futures = [stub.Score.future(big, timeout=900) for _ in range(8)]
        for future in futures:
            codes[outcome(future.result)] += 1
    return codes


def memory(target: str, port: int, pid: int) -> list[list]:
    limit_mib = parse_bytes(LIMIT) / 2**20
    reset_peak(pid)
    codes = big_calls(target)
    alone = peak_rss(pid)
    rows = [[
        f"8 concurrent raw {BIG_SIDE}² Score", f"--memory-limit {LIMIT}",
        f"peak RSS {alone:.0f} MiB = {alone / limit_mib:.2f} of the limit; calls {dict(codes)}",
    ]]  # fmt: skip
    unread_request = pb.ScoreRequest(
        model=TINY, image={"encoded": png(np.zeros((BIG_SIDE, BIG_SIDE, 3), np.uint8))}
    ).SerializeToString()
    reset_peak(pid)
    unread = [UnreadCall(HOST, port, SCORE, unread_request) for _ in range(6)]
    try:
        time.sleep(10)  # the unread responses are made and pinned
        codes = big_calls(target)
        peak = peak_rss(pid)
    finally:
        for call in unread:
            call.close()
    rows.append([
        f"6 unread ~80 MB responses, then 8 concurrent raw {BIG_SIDE}² Score",
        f"--memory-limit {LIMIT}",
        f"peak RSS {peak:.0f} MiB = {peak / limit_mib:.2f} of the limit; calls {dict(codes)}",
    ])  # fmt: skip
    return rows


def costly(target: str) -> list:
    from densemap.service.server.kserve_proto import ModelInferRequest

    flat = png(np.zeros((64, 64, 3), np.uint8))
    compute = pb.ScoreRequest(model=TINY, image={"encoded": flat})
    compute.options.scales[:] = [120.0] * 16
    compute.options.output_stride = 1
    compute.options.omit_map = True
    scales = pb.ScoreRequest(model=TINY, image={"encoded": flat})
    scales.options.scales.extend(np.ones(30_000_000).tolist())
    kserve_scales = ModelInferRequest(model_name=TINY)
    kserve_scales.inputs.add(name="image_bytes", datatype="BYTES", shape=[1])
    kserve_scales.raw_input_contents.append(len(flat).to_bytes(4, "little") + flat)
    kserve_scales.parameters["scales"].string_param = ",".join(["1"] * 40_000_000)
    contents = ModelInferRequest(model_name=TINY)
    contents.inputs.add(name="image", datatype="UINT8", shape=[4096, 4096, 4])
    contents.inputs[0].contents.uint_contents.extend(np.zeros(64 << 20, np.uint32).tolist())
    cells = []
    with channel(target) as chan:
        score = chan.unary_unary(SCORE)
        infer = chan.unary_unary(INFER)
        for name, call, request in (
            ("scales=[120]*16, stride 1, 64² PNG", score, compute),
            ("30 M scales", score, scales),
            ("KServe scales string, 40 M entries", infer, kserve_scales),
            ("64 M uint_contents", infer, contents),
        ):
            data = request.SerializeToString()
            start_time = time.perf_counter()
            code = outcome(lambda call=call, data=data: call(data, timeout=120))
            cells.append(f"{name} ({len(data) / 2**20:.0f} MiB): {code} in "
                         f"{time.perf_counter() - start_time:.2f} s")  # fmt: skip
    return ["costly requests", "refused", "; ".join(cells)]


def test_hostile_mix():
    models = BENCH_DIR / "hostile-models"
    if not (models / TINY).is_dir():
        build_repository(models)
    extra = ("--memory-limit", LIMIT, "--max-message-mb", "256")
    process, port, _metrics = start(models, "", {}, extra)
    target = f"{HOST}:{port}"
    rows = []
    try:
        log("held calls")
        rows.append(held_calls(target, port))
        log("memory")
        rows.extend(memory(target, port, process.pid))
        log("costly requests")
        rows.append(costly(target))
    finally:
        process.terminate()
        process.wait(60)
    print(f"\nmachine: {machine()}; load average {os.getloadavg()[0]:.1f}")
    print_table("hostile mix", ["what", "held", "figures"], rows)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    test_hostile_mix()
