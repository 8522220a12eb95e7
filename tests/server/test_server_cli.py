"""`densemap serve` as a process: port 0, JSON logs, SIGHUP reload, SIGTERM drain, env twins."""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import queue
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import pytest
from PIL import Image

from densemap.service.cli import build_parser
from densemap.service.client import DensemapClient, RemoteError
from densemap.service.serve_cli import build_config
from densemap.service.server.config import ServerConfig
from densemap.service.server.log_stream import RateLimit
from tests.support.paths import REPO_ROOT
from tests.support.server_fakes import wait_until
from tests.support.server_harness import (
    GREY,
    HOST,
    TINY,
    copy_repository,
    free_port,
    rgb_image,
    start_server,
)

STARTUP_SECONDS = 60.0


class ServeProcess:
    """``python -m densemap.service.cli serve ...`` with its JSON log lines collected by a thread."""

    def __init__(self, *args: str, env: dict | None = None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "densemap.service.cli", "serve", "--log-json", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.records: list[dict] = []
        self.raw: list[str] = []  # every line, as written
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.raw.append(line)
            self.lines.put(line)

    def wait_for(self, predicate, timeout: float = STARTUP_SECONDS) -> dict:
        """The first JSON log record that satisfies ``predicate`` (bounded wait)."""
        deadline = time.monotonic() + timeout
        for record in self.records:
            if predicate(record):
                return record
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                assert self.process.poll() is None, "densemap serve exited early"
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue  # e.g. onnxruntime's own lines
            self.records.append(record)
            if predicate(record):
                return record
        raise AssertionError(f"no matching log line within {timeout} s: {self.records[-5:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


def in_flight(metrics_port: int) -> float:
    url = f"http://{HOST}:{metrics_port}/metrics"
    for line in urllib.request.urlopen(url, timeout=5).read().decode().splitlines():
        if line.startswith(f'densemap_in_flight_requests{{model="{TINY}"}}'):
            return float(line.split()[-1])
    return 0.0


@pytest.mark.slow
def test_sighup_reloads_and_sigterm_drains_an_in_flight_request(repo, tmp_path):
    root = copy_repository(repo, tmp_path / "models", names=(TINY,))
    metrics_port = free_port()
    serve = ServeProcess(
        "--models", str(root), "--host", HOST, "--port", "0", "--grace-seconds", "30",
        env={"DENSEMAP_METRICS_PORT": str(metrics_port)},
    )  # fmt: skip
    try:
        port = serve.wait_for(lambda r: "port" in r)["port"]
        assert port > 0 and isinstance(port, int)
        serve.wait_for(lambda r: r["message"].startswith("ready"))
        with DensemapClient(f"{HOST}:{port}", timeout=60) as client:
            assert {m.name for m in client.list_models()} == {TINY}
            shutil.copytree(repo / GREY, root / GREY)
            serve.process.send_signal(signal.SIGHUP)
            wait_until(lambda: len(client.list_models()) == 2, what="SIGHUP reload")

            slow = {}
            request = threading.Thread(
                target=lambda: slow.update(
                    result=client.score(rgb_image(1000, 1000), model=TINY, output_stride=1)
                )
            )
            request.start()
            wait_until(lambda: in_flight(metrics_port) == 1.0, timeout=30, what="in-flight request")
            serve.process.send_signal(signal.SIGTERM)
            serve.wait_for(lambda r: r["message"].startswith("draining"))
            with pytest.raises(RemoteError) as caught:
                client.score(rgb_image(), model=TINY)
            assert caught.value.code == grpc.StatusCode.UNAVAILABLE
            request.join(60)
            assert slow["result"].maps[0].scores.shape == (5, 989, 985)
        assert serve.process.wait(30) == 0
        serve.wait_for(lambda r: r["message"].startswith("stopped"), timeout=5)
    finally:
        serve.stop()


@pytest.mark.slow
def test_a_broken_model_folder_is_logged_once(repo, tmp_path):
    root = copy_repository(repo, tmp_path / "models", names=(TINY,))
    (root / "broken").mkdir()
    (root / "broken" / "model.onnx").write_bytes(b"not onnx")
    serve = ServeProcess(
        "--models", str(root), "--host", HOST, "--port", "0", "--metrics-port", "0"
    )
    try:
        serve.wait_for(lambda r: r["message"].startswith("ready"))
        serve.process.send_signal(signal.SIGHUP)  # unchanged files: not retried, not re-logged
        serve.wait_for(lambda r: r["message"].startswith("reloaded"))
        failures = [r for r in serve.records if "failed to load" in r["message"]]
        assert len(failures) == 1 and failures[0]["model"] == "broken", failures
        assert failures[0]["level"] == "error"
    finally:
        serve.stop()


@pytest.mark.slow
def test_sigint_with_no_traffic_exits_zero_quickly(repo):
    serve = ServeProcess(
        "--models", str(repo), "--host", HOST, "--port", "0", "--metrics-port", "0"
    )
    try:
        serve.wait_for(lambda r: r["message"].startswith("ready"))
        started = time.monotonic()
        serve.process.send_signal(signal.SIGINT)
        assert serve.process.wait(30) == 0
        assert time.monotonic() - started < 10  # nothing in flight: no waiting for the grace
    finally:
        serve.stop()


@pytest.mark.slow
def test_missing_models_dir_fails_with_a_clear_message(tmp_path):
    serve = subprocess.run(
        [sys.executable, "-m", "densemap.service.cli", "serve", "--models", str(tmp_path / "none")]
        + ["--host", HOST, "--port", "0", "--metrics-port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert serve.returncode == 2
    assert "--models" in serve.stderr and "Traceback" not in serve.stderr


def test_every_flag_has_an_env_twin(monkeypatch, tmp_path):
    env = {
        "DENSEMAP_MODELS": str(tmp_path),
        "DENSEMAP_HOST": HOST,
        "DENSEMAP_PORT": "6000",
        "DENSEMAP_METRICS_PORT": "0",
        "DENSEMAP_MAX_MESSAGE_MB": "64",
        "DENSEMAP_SCORING_THREADS": "9",
        "DENSEMAP_MAX_IN_FLIGHT": "3",
        "DENSEMAP_MAX_QUEUE": "4",
        "DENSEMAP_MAX_REQUEST_GMACS": "12.5",
        "DENSEMAP_MEMORY_LIMIT": "6G",
        "DENSEMAP_WRITE_TIMEOUT_SECONDS": "20",
        "DENSEMAP_UPLOAD_GRACE_SECONDS": "2.5",
        "DENSEMAP_MAX_STREAMS": "7",
        "DENSEMAP_MAX_STREAMS_PER_PEER": "2",
        "DENSEMAP_STREAM_IDLE_SECONDS": "30",
        "DENSEMAP_GRACE_SECONDS": "5",
        "DENSEMAP_POLL_SECONDS": "2",
        "DENSEMAP_MAX_CONNECTION_AGE_SECONDS": "300",
        "DENSEMAP_AUTH_TOKEN": "t0ken",
        "DENSEMAP_DEVICE": "cpu",
        "DENSEMAP_THREADS": "1",
        "DENSEMAP_MAX_PIXELS": "1000000",
        "DENSEMAP_MEMORY_BUDGET": "32M",
        "DENSEMAP_NO_TILING": "1",
        "DENSEMAP_PRECISION": "tf32",
        "DENSEMAP_CUDA_CONV_SEARCH": "EXHAUSTIVE",
        "DENSEMAP_RUNTIME": "torch",
        "DENSEMAP_FC_HEAD_UNFOLD": "never",
        "DENSEMAP_LOG_JSON": "true",
        "DENSEMAP_LOG_LEVEL": "debug",
        "DENSEMAP_TLS_CERT": str(tmp_path / "c.pem"),
        "DENSEMAP_TLS_KEY": str(tmp_path / "k.pem"),
        "DENSEMAP_METRICS_HOST": "0.0.0.0",
        "DENSEMAP_REQUIRE_MODELS": " tiny, grey,,tiny ",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = build_parser().parse_args(["serve"])
    config = build_config(args)
    assert (config.models_dir, config.host, config.port, config.metrics_port) == (
        tmp_path, HOST, 6000, 0,
    )  # fmt: skip
    assert config.max_message_bytes == 64 << 20 and config.scoring_threads == 9
    assert (config.max_in_flight, config.max_queue, config.grace_seconds) == (3, 4, 5.0)
    assert (config.poll_seconds, config.max_connection_age_seconds) == (2.0, 300.0)
    assert (config.max_streams, config.max_streams_per_peer) == (7, 2)
    assert config.stream_idle_seconds == 30.0 and config.max_request_gmacs == 12.5
    assert config.memory_limit == 6 << 30 and config.write_timeout_seconds == 20.0
    assert config.auth_token == "t0ken" and config.tls_key == tmp_path / "k.pem"
    assert config.metrics_host == "0.0.0.0" and config.require_models == ("tiny", "grey")
    engine = config.engine
    assert (engine.device, engine.intra_op_threads, engine.max_pixels) == ("cpu", 1, 1000000)
    assert engine.memory_budget == 32 << 20 and engine.tiling is False
    assert engine.precision == "tf32"
    assert engine.cuda_conv_search == "EXHAUSTIVE"
    assert (engine.runtime, engine.fc_head_unfold) == ("torch", "never")
    assert args.log_json is True and args.log_level == "debug"
    monkeypatch.delenv("DENSEMAP_MAX_PIXELS")  # without it, the limit follows the budget
    assert build_config(build_parser().parse_args(["serve"])).engine.max_pixels == 2 << 20
    assert ServerConfig().engine.max_pixels == 8192 * 8192  # Python API: the same default
    # the command line wins over the environment
    args = build_parser().parse_args(["serve", "--port", "7000", "--max-queue", "1"])
    assert (args.port, args.max_queue) == (7000, 1)
    # every flag of `densemap serve` is covered above
    serve_parser = build_parser()._subparsers._group_actions[0].choices["serve"]
    flags = {
        a.option_strings[0]
        for a in serve_parser._actions
        if a.option_strings[0] not in ("-h", "--debug")
        and a.help is not argparse.SUPPRESS  # deprecated spellings (--workers, --tf32)
    }
    assert {"DENSEMAP_" + f[2:].replace("-", "_").upper() for f in flags} == set(env)


def encode_image(image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt, **options)
    return buffer.getvalue()


BUNDLED = REPO_ROOT / "models"


def test_defaults_serve_the_bundled_repository_on_50051(monkeypatch, tmp_path):
    monkeypatch.delenv("DENSEMAP_MODELS", raising=False)
    (tmp_path / "models" / "other").mkdir(parents=True)  # the current folder plays no part
    (tmp_path / "models" / "other" / "model.onnx").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    config = build_config(build_parser().parse_args(["serve"]))
    assert config.models_dir.resolve() == BUNDLED and config.port == 50051
    assert config.metrics_port == 9090 and config.grace_seconds == 30.0
    assert config.metrics_host == "127.0.0.1"  # plain HTTP: this host only, unless told
    assert config.require_models == ()


@pytest.mark.skipif(
    not (BUNDLED / "digits" / "model.onnx").is_file(), reason="the digits demo model is not built"
)
def test_bundled_digits_model_is_served():
    srv, port = start_server(BUNDLED)
    try:
        with DensemapClient(f"{HOST}:{port}", timeout=30) as client:
            assert "digits" in {m.name for m in client.list_models()}
            model = client.get_model("digits")
            window = model.geometry.window
            channels = model.preprocessing.channels
            image = rgb_image(window[0] * 2, window[1] * 2)[:, :, :channels]
            result = client.score(image, model="digits")
            assert result.maps[0].scores.shape[0] == model.num_classes
    finally:
        srv.stop()


def exif_jpeg() -> bytes:
    """A JPEG whose EXIF block points past its end: Pillow warns while decoding it."""
    data = encode_image(rgb_image(32, 32), "JPEG")
    entry = struct.pack("<HHII", 0x010E, 2, 100, 1000)  # ImageDescription, 100 bytes at 1000
    exif = b"Exif\x00\x00II*\x00" + struct.pack("<IH", 8, 1) + entry + struct.pack("<I", 0)
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif + data[2:]


def tiff_with_broken_tables() -> bytes:
    """A JPEG-compressed TIFF without quantization tables: libjpeg (in libtiff) writes
    "JPEGLib: Quantization table 0x00 was not defined." to fd 2."""
    data = bytearray(encode_image(rgb_image(32, 32), "TIFF", compression="jpeg"))
    directory = struct.unpack("<I", data[4:8])[0]
    for index in range(struct.unpack("<H", data[directory : directory + 2])[0]):
        at = directory + 2 + 12 * index
        tag, _, count, offset = struct.unpack("<HHII", data[at : at + 12])
        if tag == 347:  # JPEGTables: turn its DQT marker into a comment
            data[offset + bytes(data[offset : offset + count]).index(b"\xff\xdb") + 1] = 0xFE
    return bytes(data)


@pytest.mark.slow
def test_log_json_writes_only_json_lines_with_warnings_rate_limited(repo):
    serve = ServeProcess("--models", str(repo), "--host", HOST, "--port", "0",
                         "--metrics-port", "0", "--grace-seconds", "1")  # fmt: skip
    try:
        port = serve.wait_for(lambda r: "port" in r)["port"]
        serve.wait_for(lambda r: r["message"].startswith("ready"))
        with DensemapClient(f"{HOST}:{port}", timeout=30) as client:
            for _ in range(4):
                assert client.score(exif_jpeg(), model=TINY).maps
                with pytest.raises(RemoteError) as caught:
                    client.score(tiff_with_broken_tables(), model=TINY)
                assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        serve.wait_for(lambda r: r["logger"] == "densemap.stderr" and "JPEGLib" in r["message"])
        serve.process.send_signal(signal.SIGTERM)
        assert serve.process.wait(30) == 0
        serve.reader.join(10)
    finally:
        serve.stop()
    records = [json.loads(line) for line in serve.raw if line.strip()]  # every line is JSON
    warned = [r for r in records if r["logger"] == "py.warnings"]
    assert len(warned) == 1 and "Tag data larger than file" in warned[0]["message"]
    assert warned[0]["level"] == "warning" and "\n" not in warned[0]["message"]
    from_c = [r for r in records if r["logger"] == "densemap.stderr" and "JPEGLib" in r["message"]]
    assert len(from_c) == 1  # once per window, not once per request


def test_rate_limit_lets_one_message_through_per_window():
    now = [0.0]
    limit = RateLimit(window=60, clock=lambda: now[0])
    record = lambda text: logging.makeLogRecord(  # noqa: E731
        {"name": "py.warnings", "msg": text, "levelno": logging.WARNING}
    )
    assert limit.filter(record("Corrupt EXIF data. Expecting 2 bytes, got 0"))
    assert not limit.filter(record("Corrupt EXIF data. Expecting 8 bytes, got 1"))
    assert not limit.filter(record("Corrupt EXIF data. Expecting 4 bytes, got 3"))
    assert limit.filter(record("another warning"))
    assert limit.filter(logging.makeLogRecord({"name": "densemap.server", "msg": "x"}))
    now[0] = 61.0
    later = record("Corrupt EXIF data. Expecting 2 bytes, got 0")
    assert limit.filter(later) and later.suppressed == 2
    assert "2 more like it in the last 60 s" in later.getMessage()
