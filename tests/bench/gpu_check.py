"""GPU check, run by hand on a CUDA machine (CI has no GPU): the rows of the GPU-speed issue.

Run from the project root with onnxruntime-gpu and torch (CUDA) importable:
``BENCH_BUDGET_S=230 python3 tests/bench/gpu_check.py`` (docs/engine.md, "GPU check").
``GPU_CHECK_CPU=1`` runs the same rows on the CPU with small sizes, to test the script.

Rows, each with its target, in one run (ratios against the torch peer of the same run):
1. VGG-16 dense 2048², uint8 in, top-5 out: Engine fp32 vs torch fp32 cuDNN (benchmark).
2. The same, Engine fp16 vs torch fp16 autocast channels_last.
3. fp16 vs fp32 agreement: VGG-16 (noise image) and the bundled digits pages.
4. mini-VGG 2048²: Engine vs its own bare onnxruntime pass (float input, host output).
5. First request of a new shape vs steady, VGG-16 at 1000x1032, 1064x968 and 2048².
6. ``densemap serve`` (in-process gRPC, localhost) vs ``Engine.score``, 2048² uint8 -> top-5.
Then decision data: EXHAUSTIVE search in the engine, and the bare fp32 pass per search/layout.
Issue 20's rows (the head rewrite is the CUDA default, so rows 1-6 run it; "u" and "t" rows):
1u/2u. The head conv kept a conv (``fc_head_unfold="never"``) vs unfolded, fp32 and fp16.
1t/2t. The torch runtime (``runtime="torch"``): fp32 vs torch fp32, fp16 vs torch fp16
   channels_last; 3t. its fp32 map vs the onnxruntime engine's, its fp16 agreement;
   5t. its first request of a new shape vs steady; 6t. ``densemap serve --runtime torch``
   vs its ``Engine.score``.
8. Two VGG-16-sized models, each with its fp16 copy, in one process (per runtime): memory
   used after a BIG² request (after ``release_memory``) vs before it.
``GPU_CHECK_ONLY=step,step`` runs only those steps (``GPU_CHECK_SKIP`` leaves some out).
Each step runs in a process of its own, so that one step's device memory (VGG-16's 71 GB
head-conv workspace at 2048², docs/engine.md) cannot starve the next; within a step one big
VGG-16 session runs at a time (row 3a compares fp16 with fp32 at 1024² for that reason).
The report goes to $OUT/gpu_report.json (or ./gpu_report.json) and stdout, row by row.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "bench")]
os.environ.setdefault("DENSEMAP_BENCH_DIR", str(Path(tempfile.gettempdir()) / "densemap-bench"))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from bench_engine_common import VGG16, dense_model  # noqa: E402

from densemap.service.engine import Engine, EngineConfig, ScoreOptions  # noqa: E402
from tests.support.dense_models import make_dense_net  # noqa: E402

CPU = os.environ.get("GPU_CHECK_CPU") == "1"
CHILD = "--step" in sys.argv
DEVICE = "cpu" if CPU else "cuda"
BIG = 320 if CPU else 2048
AGREE = 256 if CPU else 1024  # fp16 vs fp32 agreement: both sessions' workspaces fit
NEW_SHAPES = [(300, 332), (364, 268)] if CPU else [(1000, 1032), (1064, 968)]
BUDGET_S = float(os.environ.get("BENCH_BUDGET_S", "230"))
DIGITS = ROOT / "models" / "digits"
TOP5 = ScoreOptions(top_k=5, include_map=False, image_top_k=0)
STARTED = time.time()
report: dict = {"onnxruntime": ort.__version__, "torch": torch.__version__, "rows": []}


def row(what: str, **values) -> None:
    values = {"what": what, **values, "t_s": round(time.time() - STARTED, 1)}
    print(json.dumps(values), flush=True)
    if not CHILD:  # a step's process prints its rows; the parent keeps the report
        report["rows"].append(values)
        Path(os.environ.get("OUT", "."), "gpu_report.json").write_text(json.dumps(report, indent=1))


def best(function, repeat: int = 5) -> float:
    repeat = 1 if CPU else repeat  # on CPU the script is tested, not timed (fp16 is slow)
    function()
    sync = torch.cuda.synchronize if not CPU else (lambda: None)
    times = []
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        function()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def engine(path: Path, **config) -> Engine:
    return Engine(path, config=EngineConfig(device=DEVICE, **config))


def torch_peer(spec: dict, image: np.ndarray, labels=("fp32", "fp16")) -> dict[str, float]:
    """torch/cuDNN on the same dense net: fp32 (benchmark), fp16 autocast channels_last."""
    torch.backends.cudnn.benchmark = True
    net = make_dense_net(**spec).to(DEVICE).eval()
    x = torch.from_numpy(image).to(DEVICE).permute(2, 0, 1)[None].float() / 255
    times = {}
    for label, dtype, channels_last in (("fp32", None, False), ("fp16", torch.float16, True)):
        if label not in labels:
            continue
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        model = net.to(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format
        )
        xi = x.to(memory_format=torch.channels_last) if channels_last else x

        def run(model=model, xi=xi, dtype=dtype):
            with torch.no_grad(), torch.autocast(DEVICE, dtype=dtype, enabled=dtype is not None):
                return model(xi)

        times[label] = best(run)
    del net
    if not CPU:
        torch.cuda.empty_cache()
    return times


def free_gib() -> float | None:
    return None if CPU else round(torch.cuda.mem_get_info()[0] / 2**30, 1)


def big_image(seed: int = 0, size: int = BIG) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def release() -> None:
    """Free what dropped engines and torch held on the device before the next big session
    (VGG-16's 2048² head conv keeps a 71 GB workspace in its session's arena: docs/engine.md)."""
    import gc

    gc.collect()
    if not CPU:
        torch.cuda.empty_cache()


def vgg16_fp32_rows() -> None:
    """Rows 1 and 5: the exact fp32 path against torch fp32, and first requests."""
    path = dense_model("vgg16")
    image = big_image()
    peer = torch_peer(VGG16, image, labels=("fp32",))
    release()
    fresh = engine(path)
    start = time.perf_counter()
    fresh.score(image, TOP5)
    first_big = time.perf_counter() - start
    steady = best(lambda: fresh.score(image, TOP5))
    row(f"1. VGG-16 {BIG}² uint8 -> top-5, fp32 exact vs torch fp32 cuDNN",
        engine_ms=steady * 1e3, torch_ms=peer["fp32"] * 1e3, ratio=peer["fp32"] / steady,
        target=">= 0.9", budget_mib=fresh.memory_budget >> 20,
        providers=list(fresh.providers))  # fmt: skip
    shapes = []
    for height, width in NEW_SHAPES:
        other = np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8)
        start = time.perf_counter()
        fresh.score(other, TOP5)
        first = time.perf_counter() - start
        shapes.append((f"{height}x{width}", first, best(lambda o=other: fresh.score(o, TOP5), 3)))
    shapes.append((f"{BIG}x{BIG} (first request after load)", first_big, steady))
    for name, first, steady_s in shapes:
        row(f"5. first request of a new shape, VGG-16 {name}", first_ms=first * 1e3,
            steady_ms=steady_s * 1e3, ratio=first / steady_s, target="<= 2")  # fmt: skip


def vgg16_fp16_rows() -> None:
    """Rows 2 and 3a: fp16 against torch fp16 at BIG (only the fp16 session runs there), then
    fp16 vs fp32 agreement at AGREE² (both sessions' workspaces must fit beside each other)."""
    path = dense_model("vgg16")
    image = big_image()
    peer = torch_peer(VGG16, image, labels=("fp16",))
    release()
    fresh = engine(path)
    fp16 = ScoreOptions(**{**TOP5.__dict__, "precision": "fp16"})
    free_before = free_gib()
    start = time.perf_counter()
    fresh.score(image, fp16)
    first = time.perf_counter() - start
    steady = best(lambda: fresh.score(image, fp16))
    row(f"2. VGG-16 {BIG}² uint8 -> top-5, fp16 vs torch fp16 autocast channels_last",
        engine_ms=steady * 1e3, torch_ms=peer["fp16"] * 1e3, ratio=peer["fp16"] / steady,
        target=">= 1.0", first_ms=first * 1e3, free_gib_before=free_before)  # fmt: skip
    report_fp16 = fresh.compare_precision(big_image(3, AGREE), "fp16")
    row(f"3a. fp16 vs fp32, VGG-16 {AGREE}² noise image", **report_fp16.__dict__,
        target="argmax agreement >= 0.999")  # fmt: skip


def vgg16_serve_row() -> None:
    """Row 6: ``Engine.score`` first, then that engine released and the server started, so
    that one VGG-16 session holds the device at a time."""
    path = dense_model("vgg16")
    image = big_image()
    direct = engine(path)
    local = best(lambda: direct.score(image, TOP5))
    direct = None
    release()
    remote = serve_time(path, image)
    row(f"6. densemap serve vs Engine.score, {BIG}² uint8 -> top-5", serve_ms=remote * 1e3,
        engine_ms=local * 1e3, ratio=remote / local, target="<= 1.2")  # fmt: skip


def vgg16_exhaustive_rows() -> None:
    """Decision data: the engine with EXHAUSTIVE cuDNN search, fp32 then fp16."""
    exhaustive_rows(dense_model("vgg16"), big_image())


def exhaustive_rows(path: Path, image: np.ndarray) -> None:
    """The same engine with EXHAUSTIVE cuDNN search: steady speed vs first-request cost."""
    searched = engine(path, cuda_conv_search="EXHAUSTIVE")
    for precision in ("fp32", "fp16"):
        options = ScoreOptions(**{**TOP5.__dict__, "precision": precision})
        start = time.perf_counter()
        searched.score(image, options)
        first = time.perf_counter() - start
        steady = best(lambda o=options: searched.score(image, o))
        row(f"1b/2b. VGG-16 {BIG}² {precision}, EXHAUSTIVE search (decision data)",
            steady_ms=steady * 1e3, first_ms=first * 1e3,
            first_over_steady=first / steady)  # fmt: skip


def used_bytes() -> int:
    """Device memory in use (CUDA: total - free), or the process's resident memory on CPU."""
    if CPU:
        import psutil

        return psutil.Process().memory_info().rss
    free, total = torch.cuda.mem_get_info()
    return total - free


def unfold_rows() -> None:
    """Decision data for the head rewrite: the engine with VGG-16's head conv kept a conv
    vs unfolded (the CUDA default), fp32 and fp16, free memory before each."""
    path = dense_model("vgg16")
    image = big_image()
    for mode in ("always" if CPU else "cuda", "never"):  # "cuda" would not unfold on CPU
        for precision in ("fp32", "fp16"):
            release()
            free_before = free_gib()
            try:
                subject = engine(path, fc_head_unfold=mode, report_precisions=())
                options = ScoreOptions(**{**TOP5.__dict__, "precision": precision})
                steady = best(lambda s=subject, o=options: s.score(image, o), 3)
                row(f"1u/2u. VGG-16 {BIG}² {precision}, fc_head_unfold={mode}",
                    steady_ms=steady * 1e3, free_gib_before=free_before,
                    free_gib_after=free_gib())  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - an out-of-memory is the data here
                row(f"1u/2u. VGG-16 {BIG}² {precision}, fc_head_unfold={mode} failed",
                    error=f"{type(exc).__name__}: {str(exc)[:300]}")  # fmt: skip
            subject = None


def torch_runtime_rows() -> None:
    """Rows 1t, 2t, 3t, 5t: the torch runtime against the torch peer, the onnxruntime
    engine, and its own steady time."""
    from densemap.service.engine.precision import compare_maps

    path = dense_model("vgg16")
    image = big_image()
    peer = torch_peer(VGG16, image)
    release()
    fresh = engine(path, runtime="torch", report_precisions=())
    start = time.perf_counter()
    fresh.score(image, TOP5)
    first_big = time.perf_counter() - start
    fp16 = ScoreOptions(**{**TOP5.__dict__, "precision": "fp16"})
    steady = best(lambda: fresh.score(image, TOP5))
    row(f"1t. VGG-16 {BIG}² uint8 -> top-5, runtime torch fp32 vs torch fp32 cuDNN",
        engine_ms=steady * 1e3, torch_ms=peer["fp32"] * 1e3, ratio=peer["fp32"] / steady,
        target=">= 0.9", providers=list(fresh.providers))  # fmt: skip
    if CPU:  # torch's CPU half convs: 119 s a pass here; row 3t still runs fp16 (smaller)
        row("2t. skipped on CPU: torch's CPU float16 convolutions are ~15x its float32")
    else:
        start = time.perf_counter()
        fresh.score(image, fp16)
        first16 = time.perf_counter() - start
        steady16 = best(lambda: fresh.score(image, fp16))
        row(f"2t. VGG-16 {BIG}² uint8 -> top-5, runtime torch fp16 vs torch fp16 channels_last",
            engine_ms=steady16 * 1e3, torch_ms=peer["fp16"] * 1e3,
            ratio=peer["fp16"] / steady16, target=">= 1.0", first_ms=first16 * 1e3)  # fmt: skip
    small = big_image(3, AGREE)
    agreement = fresh.compare_precision(small, "fp16")
    row(f"3t. runtime torch fp16 vs its fp32, VGG-16 {AGREE}² noise image",
        **agreement.__dict__, target="argmax agreement >= 0.999")  # fmt: skip
    logits = ScoreOptions(probabilities=False, image_top_k=0)
    mine = fresh.score(small, logits).maps[0].scores
    fresh_shapes = []
    for height, width in NEW_SHAPES:
        other = np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8)
        start = time.perf_counter()
        fresh.score(other, TOP5)
        first = time.perf_counter() - start
        fresh_shapes.append((f"{height}x{width}", first,
                             best(lambda o=other: fresh.score(o, TOP5), 3)))  # fmt: skip
    fresh_shapes.append((f"{BIG}x{BIG} (first request after load)", first_big, steady))
    for name, first, steady_s in fresh_shapes:
        row(f"5t. runtime torch, first request of a new shape, VGG-16 {name}",
            first_ms=first * 1e3, steady_ms=steady_s * 1e3, ratio=first / steady_s,
            target="<= 2")  # fmt: skip
    fresh = None
    release()
    reference = engine(path, report_precisions=()).score(small, logits).maps[0].scores
    exact = compare_maps("fp32", reference, mine, image=f"noise {AGREE}²")
    row(f"3t. runtime torch fp32 vs runtime ort fp32, VGG-16 {AGREE}²", **exact.__dict__,
        target="max_logit_deviation <= 1e-5, argmax agreement 1.0")  # fmt: skip


def two_models_rows() -> None:
    """Row 8: two VGG-16-sized models, each with its fp16 copy, in one process, per
    runtime; memory in use after a BIG² request (and release_memory) vs before it."""
    first = dense_model("vgg16")
    second = first.parent.with_name("vgg16_second") / "model.onnx"
    if not second.is_file():
        second.parent.mkdir(parents=True, exist_ok=True)
        second.symlink_to(first)
    image = big_image()
    for runtime in ("ort", "torch"):
        release()
        try:
            reports = () if CPU and runtime == "torch" else ("fp16",)
            engines = [engine(p, runtime=runtime, report_precisions=reports)
                       for p in (first, second)]  # fmt: skip
            # torch's CPU half convs are ~15x slower than fp32 (VGG-16 320²: 119 s a pass):
            # on CPU, where the script is only tested, the torch runtime's fp16 is left out
            cpu_torch = CPU and runtime == "torch"
            for precision in ("fp32",) if cpu_torch else ("fp32", "fp16"):
                options = ScoreOptions(**{**TOP5.__dict__, "precision": precision})
                for subject in engines:  # every session made and warm before measuring
                    subject.score(image, options)
                before = used_bytes()
                for subject in engines:
                    subject.score(image, options)
                after = used_bytes()
                row(f"8. two VGG-16 + fp16 copies in one process, runtime {runtime}, "
                    f"{precision} {BIG}² request", used_gib_before=before / 2**30,
                    used_gib_after=after / 2**30, ratio=after / before,
                    target="<= 1.1")  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - an out-of-memory is the data here
            row(f"8. two VGG-16 + fp16 copies, runtime {runtime} failed",
                error=f"{type(exc).__name__}: {str(exc)[:300]}")  # fmt: skip
        engines = None


def torch_serve_row() -> None:
    """Row 6t: ``densemap serve --runtime torch`` vs that runtime's ``Engine.score``."""
    path = dense_model("vgg16")
    image = big_image()
    direct = engine(path, runtime="torch", report_precisions=())
    local = best(lambda: direct.score(image, TOP5))
    direct = None
    release()
    remote = serve_time(path, image, runtime="torch")
    row(f"6t. densemap serve --runtime torch vs Engine.score, {BIG}² uint8 -> top-5",
        serve_ms=remote * 1e3, engine_ms=local * 1e3, ratio=remote / local,
        target="<= 1.2")  # fmt: skip


def serve_time(path: Path, image: np.ndarray, *, runtime: str = "ort") -> float:
    """Best time of a densemap.v1 top-5 request through an in-process server on localhost."""
    from densemap.service.client import DensemapClient
    from densemap.service.server.app import create_server
    from densemap.service.server.config import ServerConfig

    with tempfile.TemporaryDirectory() as root:
        folder = Path(root) / "vgg16"
        folder.mkdir()
        (folder / "model.onnx").symlink_to(path)
        config = ServerConfig(
            models_dir=Path(root), host="127.0.0.1", port=0, metrics_port=0,
            max_message_bytes=64 << 20, engine=EngineConfig(device=DEVICE, runtime=runtime),
        )  # fmt: skip
        server, port = create_server(config)
        try:
            assert server.wait_ready(300), "the server did not load VGG-16"
            with DensemapClient(f"127.0.0.1:{port}", timeout=120) as client:
                return best(lambda: client.score(image, model="vgg16", top_k=5,
                                                 include_map=False, image_top_k=0))  # fmt: skip
        finally:
            server.stop(5)


def mini_vgg_row() -> None:
    path = dense_model("mini_vgg")
    image = np.random.default_rng(2).integers(0, 256, (BIG, BIG, 3), dtype=np.uint8)
    fast = engine(path)
    batch = (image.astype(np.float32) / 255).transpose(2, 0, 1)[None].copy()
    cuda = ("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC", "use_tf32": "0"})
    providers = ["CPUExecutionProvider"] if CPU else [cuda, "CPUExecutionProvider"]
    bare = ort.InferenceSession(str(path), providers=providers)
    engine_s = best(lambda: fast.score(image, TOP5))
    bare_s = best(lambda: bare.run(None, {"input": batch}))
    row(f"4. mini-VGG {BIG}²: Engine vs its own bare pass", engine_ms=engine_s * 1e3,
        bare_ms=bare_s * 1e3, ratio=bare_s / engine_s, target=">= 0.9")  # fmt: skip


def digits_row() -> None:
    pages = sorted((DIGITS / "pages").glob("*.png"))
    digits = engine(DIGITS / "model.onnx")
    worst, agree, cells = 0.0, 0, 0
    for page in pages:
        result = digits.compare_precision(page.read_bytes(), "fp16", output_stride=2)
        worst = max(worst, result.max_probability_deviation)
        agree += round(result.argmax_agreement * result.cells)
        cells += result.cells
    row("3b. fp16 vs fp32, digits pages at stride 2", max_probability_deviation=worst,
        argmax_agreement=agree / cells, cells=cells, target="argmax agreement = 1.0")  # fmt: skip


def bare_fp32_rows() -> None:
    """Decision data: the bare VGG-16 fp32 pass (TF32 off, IO binding, tensors on the
    device) under each cuDNN search and layout, to choose the engine's fp32 settings."""
    path = dense_model("vgg16")
    image = np.random.default_rng(0).integers(0, 256, (BIG, BIG, 3), dtype=np.uint8)
    batch = (image.astype(np.float32) / 255).transpose(2, 0, 1)[None].copy()
    device = "cpu" if CPU else "cuda"
    for search in ("HEURISTIC", "EXHAUSTIVE"):
        for nhwc in os.environ.get("GPU_CHECK_NHWC", "0,1").split(","):
            if time.time() - STARTED > BUDGET_S:
                return
            workspace = os.environ.get("GPU_CHECK_MAX_WORKSPACE", "1")  # onnxruntime's default
            cuda = ("CUDAExecutionProvider", {"cudnn_conv_algo_search": search, "use_tf32": "0",
                                              "prefer_nhwc": nhwc,
                                              "cudnn_conv_use_max_workspace": workspace})  # fmt: skip
            try:
                session = ort.InferenceSession(
                    str(path), providers=["CPUExecutionProvider"] if CPU else [cuda]
                )
                binding = session.io_binding()
                binding.bind_ortvalue_input(
                    "input", ort.OrtValue.ortvalue_from_numpy(batch, device, 0)
                )
                binding.bind_output(session.get_outputs()[0].name, device)

                def run(session=session, binding=binding):
                    session.run_with_iobinding(binding)
                    binding.synchronize_outputs()

                start = time.perf_counter()
                run()
                first = time.perf_counter() - start
                row(f"7. bare VGG-16 {BIG}² fp32 pass, IO binding, {search}, prefer_nhwc={nhwc}, "
                    f"max_workspace={workspace} (decision data)", steady_ms=best(run) * 1e3, first_ms=first * 1e3)  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - a refused setting is data too
                row(f"7. bare VGG-16 fp32, {search}, prefer_nhwc={nhwc} failed",
                    error=f"{type(exc).__name__}: {str(exc)[:300]}")  # fmt: skip
            finally:
                session = binding = None


STEPS = {
    step.__name__: step
    for step in (
        digits_row,
        mini_vgg_row,
        vgg16_fp32_rows,
        vgg16_fp16_rows,
        vgg16_serve_row,
        vgg16_exhaustive_rows,
        bare_fp32_rows,
        unfold_rows,
        torch_runtime_rows,
        two_models_rows,
        torch_serve_row,
    )
}


def run_step(name: str) -> None:
    """One step in a process of its own (its device memory goes with it), its rows kept."""
    import subprocess

    left = max(30.0, BUDGET_S - (time.time() - STARTED) + 60)
    try:
        done = subprocess.run(
            [sys.executable, __file__, "--step", name],
            stdout=subprocess.PIPE, text=True, timeout=left,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        out, failure = exc.stdout or "", f"timed out after {left:.0f} s"
    else:
        out, failure = done.stdout, None if done.returncode == 0 else f"exit {done.returncode}"
    for line in (out.decode() if isinstance(out, bytes) else out).splitlines():
        if line.startswith('{"what"'):
            values = json.loads(line)
            row(values.pop("what"), **{k: v for k, v in values.items() if k != "t_s"})
    if failure:
        row(f"{name} failed", error=failure)


def main() -> int:
    if CHILD:
        name = sys.argv[sys.argv.index("--step") + 1]
        try:
            STEPS[name]()
        except Exception as exc:  # noqa: BLE001 - reported as a row, then the next step
            row(f"{name} failed", error=f"{type(exc).__name__}: {str(exc)[:500]}")
        return 0
    report["device"] = "cpu" if CPU else torch.cuda.get_device_name()
    skip = os.environ.get("GPU_CHECK_SKIP", "").split(",")  # step names, e.g. bare_fp32_rows
    only = [name for name in os.environ.get("GPU_CHECK_ONLY", "").split(",") if name]
    for name in STEPS:
        if name in skip or (only and name not in only):
            continue
        if time.time() - STARTED > BUDGET_S:
            row(f"{name} skipped: over BENCH_BUDGET_S={BUDGET_S:g}")
            continue
        run_step(name)
    report["total_s"] = round(time.time() - STARTED, 1)
    row("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
