"""GPU check, run by hand on a CUDA machine (CI has no GPU): ``python tests/bench/gpu_check.py``.

1. CUDA really loads through the engine (``session.get_providers()``), with its options.
2. GPU maps vs CPU maps on the bundled digits pages at strides 4, 2 and 1, TF32 on and off.
3. float16 output vs float32 on the GPU.
4. First request of a new image shape vs the steady state (cuDNN HEURISTIC search).
5. mini-VGG: dense pass vs batched crops, and à trous vs shift-and-stitch, on the GPU.

Models for 5 come from $DENSEMAP_BENCH_DIR (built by bench_engine_common on a CPU machine).
The report goes to $OUT/gpu_report.json (or ./gpu_report.json) and stdout.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from service.engine import Engine, EngineConfig, ScoreOptions  # noqa: E402
from service.engine import session as engine_session  # noqa: E402

BENCH = Path(os.environ.get("DENSEMAP_BENCH_DIR", ROOT / ".gpubench"))
DIGITS = ROOT / "models" / "digits" / "model.onnx"
report: dict = {"onnxruntime": ort.__version__}


def timed(function, repeat: int = 5) -> float:
    function()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def compare_digits() -> None:
    pages = [p.read_bytes() for p in sorted((DIGITS.parent / "pages").glob("*.png"))]
    cpu = Engine(DIGITS, config=EngineConfig(device="cpu"))
    for flag in ("0", "1"):
        gpu = Engine(DIGITS, config=EngineConfig(device="cuda", tf32=flag == "1"))
        report["providers"] = gpu.providers
        rows = []
        for stride in (4, 2, 1):
            options = ScoreOptions(output_stride=stride, probabilities=False)
            worst_logit = worst_prob = 0.0
            agree = cells = 0
            for page in pages:
                a = cpu.score(page, options).maps[0].scores
                b = gpu.score(page, options).maps[0].scores
                scale = max(1.0, float(np.abs(a).max()))
                worst_logit = max(worst_logit, float(np.abs(a - b).max()) / scale)
                pa = np.exp(a - a.max(0)) / np.exp(a - a.max(0)).sum(0)
                pb = np.exp(b - b.max(0)) / np.exp(b - b.max(0)).sum(0)
                worst_prob = max(worst_prob, float(np.abs(pa - pb).max()))
                agree += int((a.argmax(0) == b.argmax(0)).sum())
                cells += a.shape[1] * a.shape[2]
            rows.append(
                dict(
                    stride=stride,
                    max_rel_logit_diff=worst_logit,
                    max_prob_diff=worst_prob,
                    argmax_agreement=agree / cells,
                )
            )
        report[f"digits_gpu_vs_cpu_tf32_{flag}"] = rows
        fp32 = gpu.score(pages[0], ScoreOptions()).maps[0].scores
        fp16 = gpu.score(pages[0], ScoreOptions(dtype="float16")).maps[0].scores
        report[f"fp16_vs_fp32_max_prob_diff_tf32_{flag}"] = float(
            np.abs(fp16.astype(np.float32) - fp32).max()
        )


def first_request_latency() -> None:
    engine = Engine(BENCH / "mini_vgg_s2_s4" / "model.onnx", config=EngineConfig(device="cuda"))
    rng = np.random.default_rng(0)
    rows = []
    for size in (517, 1031, 2053):
        image = rng.integers(0, 256, (size, size + 7, 3), dtype=np.uint8)
        options = ScoreOptions(image_top_k=0)
        start = time.perf_counter()
        engine.score(image, options)
        first = time.perf_counter() - start
        steady = timed(lambda image=image, options=options: engine.score(image, options))
        rows.append(dict(size=size, first_s=first, steady_s=steady, ratio=first / steady))
    report["first_request_vs_steady"] = rows


def dense_vs_crops() -> None:
    config = EngineConfig(device="cuda", memory_budget=1 << 34)
    engine = Engine(BENCH / "mini_vgg_s2_s4" / "model.onnx", config=config)
    geometry = engine.metadata.geometry
    window, stride = geometry.window[0], geometry.stride[0]
    crops_session = ort.InferenceSession(
        str(BENCH / "mini_vgg_crops.onnx"),
        providers=[
            (engine_session.CUDA, engine_session.cuda_provider_options()),
            "CPUExecutionProvider",
        ],
    )
    rng = np.random.default_rng(0)
    rows = []
    for size in (512, 1024):
        image_chw = rng.normal(size=(3, size, size)).astype(np.float32)
        options = ScoreOptions(probabilities=False, image_top_k=0)
        dense = engine.score(image_chw, options).maps[0].scores
        n_h, n_w = dense.shape[1:]
        origins = [(i * stride, j * stride) for i in range(n_h) for j in range(n_w)]
        outputs: list[np.ndarray] = []

        def run_crops(image_chw=image_chw, origins=origins, outputs=outputs) -> None:
            outputs.clear()
            for start in range(0, len(origins), 512):
                batch = np.stack(
                    [
                        image_chw[:, t : t + window, s : s + window]
                        for t, s in origins[start : start + 512]
                    ]
                )
                outputs.append(crops_session.run(None, {"input": batch})[0][:, :, 0, 0])

        dense_s = timed(lambda x=image_chw, o=options: engine.score(x, o), repeat=3)
        crops_s = timed(run_crops, repeat=2)
        crops = np.concatenate(outputs).T.reshape(dense.shape)
        stitch = timed(
            lambda image_chw=image_chw: engine.score(
                image_chw,
                ScoreOptions(output_stride=stride // 2, probabilities=False, image_top_k=0),
            ),
            repeat=3,
        )
        tf32_engine = Engine(
            BENCH / "mini_vgg_s2_s4" / "model.onnx",
            config=EngineConfig(device="cuda", memory_budget=1 << 34, tf32=True),
        )
        tf32_s = timed(lambda x=image_chw, o=options, e=tf32_engine: e.score(x, o), repeat=3)
        tf32_map = tf32_engine.score(image_chw, options).maps[0].scores
        rows.append(
            dict(
                size=size,
                crops=len(origins),
                dense_tf32_s=tf32_s,
                tf32_max_abs_diff_vs_crops=float(np.abs(tf32_map - crops).max()),
                dense_s=dense_s,
                crops_s=crops_s,
                speedup=crops_s / dense_s,
                max_abs_diff_vs_crops=float(np.abs(dense - crops).max()),
                atrous_stride_half_s=stitch,
            )
        )
    report["mini_vgg_dense_vs_crops_gpu"] = rows


def main() -> int:
    for step in (compare_digits, first_request_latency, dense_vs_crops):
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - one failed step must not hide the others
            report[f"{step.__name__}_error"] = repr(exc)
    text = json.dumps(report, indent=1)
    print(text)
    Path(os.environ.get("OUT", "."), "gpu_report.json").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
