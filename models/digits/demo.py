"""The main job, end to end: serve the bundled repository, read the sample pages over gRPC.

``make demo`` (or ``python -m models.digits.demo`` from the repository root):

1. starts ``densemap serve`` on the bundled ``models/`` repository, on a free port, and waits
   until its ``readiness`` health status is SERVING;
2. scores the sample pages through the gRPC API (``densemap score --server ...``) at the
   native stride 4 and at stride 2 (one pass on the à-trous variant), with heat-maps
   (redrawn on every run: ``--overwrite``);
3. prints a table (page, map shape, digits found against the page's ground truth) and
   where the pictures are;
4. stops the server with SIGTERM (graceful drain) and checks that it exited cleanly.
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from models.digits.reading import Grid, find_digits

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
PAGES = MODELS / "digits" / "pages"
BACKGROUND = 10  # index of the 'background' label in models/digits/labels.txt
MATCH_PX = 6.0  # a detection names a drawn digit when its centre is this close
STRIDES = (4, 2)
READY_TIMEOUT_S = 120.0


def start_server(log_path: Path) -> tuple[subprocess.Popen, int]:
    """Start ``densemap serve`` on a free port; return the process and its port."""
    cmd = [sys.executable, "-m", "service.cli", "serve", "--models", str(MODELS)]
    cmd += ["--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    port_box: list[int] = []
    found = threading.Event()

    def pump() -> None:  # keep reading the log so the server never blocks on a full pipe
        with log_path.open("w") as log:
            for line in proc.stderr:
                log.write(line)
                log.flush()
                match = re.search(r"densemap serving on \S+:(\d+)", line)
                if match and not port_box:
                    port_box.append(int(match.group(1)))
                    found.set()
        found.set()

    threading.Thread(target=pump, daemon=True).start()
    if not found.wait(READY_TIMEOUT_S) or not port_box:
        proc.kill()
        raise SystemExit(f"demo: the server did not start; see {log_path}")
    return proc, port_box[0]


def wait_ready(target: str) -> None:
    from service.client import DensemapClient

    deadline = time.monotonic() + READY_TIMEOUT_S
    with DensemapClient(target) as client:
        while time.monotonic() < deadline:
            if client.ready("readiness", timeout=2.0):
                return
            time.sleep(0.2)
    raise SystemExit(f"demo: the server at {target} did not become ready")


def score_pages(target: str, out: Path, stride: int) -> None:
    cmd = [sys.executable, "-m", "service.cli", "score", "--server", target, str(PAGES)]
    cmd += ["--glob", "*.png", "--out", str(out), "--output-stride", str(stride), "--heatmap"]
    cmd += ["--overwrite"]  # always fresh pictures, even after a code or model update
    result = subprocess.run(cmd, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"demo: densemap score failed (exit {result.returncode})")


def read_truth(page: Path) -> list[tuple[int, float, float]]:
    rows = (line.split() for line in page.with_suffix(".txt").read_text().splitlines())
    return [(int(r[0]), float(r[1]), float(r[2])) for r in rows if r]


def summarise(page: Path, npz: Path) -> tuple[str, str, int, int]:
    """(map shape, digits found in reading order, correct detections, digits drawn)."""
    from service.batch.outputs import load_result

    result, _meta = load_result(npz)
    scale_map = result.maps[0]
    geo = scale_map.geometry
    grid = Grid(stride=geo.stride, window=geo.window, origin=geo.origin)
    found = find_digits(scale_map.scores.astype("float32"), grid, background=BACKGROUND)
    truth = read_truth(page)
    correct = sum(
        any(
            d.label == label and max(abs(d.centre[0] - y), abs(d.centre[1] - x)) <= MATCH_PX
            for d in found
        )
        for label, y, x in truth
    )
    reading = " ".join(
        result.labels[d.label] for d in sorted(found, key=lambda d: (d.centre[0], d.centre[1]))
    )
    shape = "x".join(str(n) for n in scale_map.shape)
    return shape, reading, correct, len(truth)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "demo-out", help="output folder")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    pages = sorted(PAGES.glob("*.png"))

    proc, port = start_server(out / "server.log")
    target = f"127.0.0.1:{port}"
    try:
        wait_ready(target)
        print(f"densemap serve is ready on {target} (log: {out / 'server.log'})", flush=True)
        for stride in STRIDES:
            score_pages(target, out / f"stride{stride}", stride)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = -1
    if code != 0:
        print(f"demo: the server exited with {code}; see {out / 'server.log'}", file=sys.stderr)
        return 1

    print(f"\n{'page':<12} {'stride':>6} {'map':>8} {'found':>7}  digits (reading order)")
    for stride in STRIDES:
        for page in pages:
            npz = out / f"stride{stride}" / f"{page.name}.npz"
            shape, reading, correct, drawn = summarise(page, npz)
            print(f"{page.name:<12} {stride:>6} {shape:>8} {correct:>3}/{drawn:<3}  {reading}")
    print(f"\nheat-maps: {out}/stride*/*.heatmap.png   maps: {out}/stride*/*.npz")
    print("server stopped cleanly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
