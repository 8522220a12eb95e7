"""The main job, end to end: serve the bundled repository, read the sample pages over gRPC.

``make demo`` (or ``python -m models.digits.demo`` from the repository root):

1. starts ``densemap serve`` on the bundled ``models/`` repository, on a free port, and waits
   until its ``readiness`` health status is SERVING;
2. scores the sample pages through the gRPC API (``densemap score --server ...``) at the
   native stride 4 and at stride 2 (one pass on the à-trous variant), with heat-maps
   (redrawn on every run: ``--overwrite``) and the product's detections
   (``--detections``: boxes after NMS, written to ``detections.jsonl``);
3. prints a table (page, map shape, digits found: boxes with the right label and IoU >= 0.5
   with a drawn digit's box, from the page's ground truth) and where the pictures are;
4. stops the server with SIGTERM (graceful drain) and checks that it exited cleanly.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from models.digits.reading import digit_box, match_boxes

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
PAGES = MODELS / "digits" / "pages"
MIN_IOU = 0.5  # a box names a drawn digit when their IoU is at least this
# the digits' detection settings (threshold 0.5, NMS IoU 0.3 across classes) are the model's
# own, in models/digits/densemap.json: densemap score and the server apply them
DETECTION_FLAGS = ("--detections",)
STRIDES = (4, 2)
READY_TIMEOUT_S = 120.0


def start_server(log_path: Path) -> tuple[subprocess.Popen, int]:
    """Start ``densemap serve`` on a free port; return the process and its port."""
    cmd = [sys.executable, "-m", "densemap.service.cli", "serve", "--models", str(MODELS)]
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
    from densemap.service.client import DensemapClient

    deadline = time.monotonic() + READY_TIMEOUT_S
    with DensemapClient(target) as client:
        while time.monotonic() < deadline:
            if client.ready("readiness", timeout=2.0):
                return
            time.sleep(0.2)
    raise SystemExit(f"demo: the server at {target} did not become ready")


def score_pages(target: str, out: Path, stride: int) -> None:
    cmd = [sys.executable, "-m", "densemap.service.cli", "score", "--server", target, str(PAGES)]
    cmd += ["--glob", "*.png", "--out", str(out), "--output-stride", str(stride), "--heatmap"]
    cmd += ["--overwrite", *DETECTION_FLAGS]  # always fresh outputs, even after an update
    result = subprocess.run(cmd, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"demo: densemap score failed (exit {result.returncode})")


def read_truth(page: Path) -> list[tuple[int, tuple[float, float, float, float]]]:
    """(label, box) of each digit drawn: ``label centre_y centre_x size`` per line."""
    rows = (line.split() for line in page.with_suffix(".txt").read_text().splitlines())
    return [(int(r[0]), digit_box((float(r[1]), float(r[2])), float(r[3]))) for r in rows if r]


def read_lines(path: Path) -> dict[str, dict]:
    return {doc["relpath"]: doc for doc in map(json.loads, path.read_text().splitlines())}


def summarise(page: Path, out: Path) -> tuple[str, str, int, int]:
    """(map shape, digits found in reading order, correct boxes, digits drawn)."""
    found = read_lines(out / "detections.jsonl")[page.name]["detections"]
    shape = read_lines(out / "summary.jsonl")[page.name]["map_shape"][0]
    truth = read_truth(page)
    correct = match_boxes([(d["class_index"], d["box"]) for d in found], truth, min_iou=MIN_IOU)
    reading = " ".join(d["label"] for d in sorted(found, key=lambda d: (d["box"][1], d["box"][0])))
    return "x".join(str(n) for n in shape), reading, correct, len(truth)


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
            shape, reading, correct, drawn = summarise(page, out / f"stride{stride}")
            print(f"{page.name:<12} {stride:>6} {shape:>8} {correct:>3}/{drawn:<3}  {reading}")
    print(f"\nheat-maps: {out}/stride*/*.heatmap.png   maps: {out}/stride*/*.npz")
    print(f"boxes: {out}/stride*/detections.jsonl (and detections.coco.json)")
    print("server stopped cleanly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
