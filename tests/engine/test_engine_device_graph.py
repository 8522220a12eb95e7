"""The graphs the engine runs around the model (preprocess, postprocess) and precisions.

They run on the CPU execution provider here, exactly as on CUDA. Reference: the host-side
numpy path (``preprocess`` + one host pass + numpy softmax/top-k/argmax). fp32 logits must
be equal bit for bit (same inputs, same model, same kernels); probabilities within a few
float32 ulps (onnxruntime's Exp and its summation order are not numpy's).
"""

from __future__ import annotations

import ctypes
import platform
from dataclasses import replace

import numpy as np
import onnxruntime as ort
import pytest

from densemap.service.contract import Preprocessing
from densemap.service.engine import (
    Engine,
    EngineConfig,
    ScoreOptions,
    graphs,
    host_memory,
    preprocess,
)
from densemap.service.engine import engine as engine_module
from densemap.service.engine.arena_policy import ReleasePolicy
from densemap.service.engine.postprocess import softmax
from densemap.service.errors import InvalidOption, ModelLoadError
from tests.support.dense_models import build_dense_model
from tests.support.paths import REPO_ROOT

DIGITS = REPO_ROOT / "models" / "digits"
# float32 probabilities: softmax of logits via onnxruntime's Exp vs numpy's exp differs by a
# few ulps (~6e-8 relative); 1e-6 absolute on values in [0, 1] leaves room and still catches
# any real error (a wrong axis or a missing normalisation is off by > 1e-2).
PROB_ATOL = 1e-6


def reference_logits(engine: Engine, image: np.ndarray) -> np.ndarray:
    image_chw = preprocess(image, engine.metadata.preprocessing)
    return engine._nets[0].run(image_chw)  # the host fp32 pass the engine had before


def ranked(values: np.ndarray, k: int) -> np.ndarray:
    """Top-k class indices, ties by lowest class index (the graphs' documented rule)."""
    order = np.argsort(-values.astype(np.float32), axis=0, kind="stable")
    return order[:k]


@pytest.fixture(scope="module")
def rgb_model(tmp_path_factory):
    return build_dense_model(tmp_path_factory.mktemp("rgb"), channels=3, classes=7)


@pytest.mark.parametrize("color", ["RGB", "BGR", "L"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_preprocess_graph_is_bit_identical_to_numpy(color, layout):
    channels = 1 if color == "L" else 3
    prep = Preprocessing(
        layout=layout,
        color=color,
        scale=1 / 255,
        mean=(0.485, 0.456, 0.406)[:channels],
        std=(0.229, 0.224, 0.225)[:channels],
    )
    image = np.random.default_rng(3).integers(0, 256, (37, 53, channels), dtype=np.uint8)
    session = ort.InferenceSession(
        graphs.preprocess_graph(prep, source="uint8", layout=layout),
        providers=["CPUExecutionProvider"],
    )
    region = dict(starts=np.array([3, 5]), ends=np.array([30, 50]))
    (out,) = session.run(None, {"pixels": image, **region})
    expected = preprocess(image[3:30, 5:50], prep)[None]
    if layout == "NHWC":
        expected = expected.transpose(0, 2, 3, 1)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, expected)


def test_logits_map_is_bit_identical_to_the_host_pass(rgb_model):
    engine = Engine(rgb_model, config=EngineConfig(warmup=False))
    image = np.random.default_rng(0).integers(0, 256, (45, 61, 3), dtype=np.uint8)
    result = engine.score(image, ScoreOptions(probabilities=False, top_k=3, argmax=True))
    scores = result.maps[0].scores
    reference = reference_logits(engine, image)
    np.testing.assert_array_equal(scores, reference)
    np.testing.assert_array_equal(result.maps[0].top_k_indices, ranked(reference, 3))
    np.testing.assert_array_equal(result.maps[0].argmax, reference.argmax(axis=0))
    expected_image = softmax(reference).mean(axis=(1, 2), dtype=np.float64)
    np.testing.assert_allclose(result.image_scores, expected_image, atol=PROB_ATOL)


def test_probabilities_classes_and_float16_on_the_device(rgb_model):
    engine = Engine(rgb_model, config=EngineConfig(warmup=False))
    image = np.random.default_rng(1).integers(0, 256, (40, 52, 3), dtype=np.uint8)
    probabilities = softmax(reference_logits(engine, image))
    classes = (5, 0, 3)
    options = ScoreOptions(classes=classes, top_k=2, argmax=True)
    result = engine.score(image, options).maps[0]
    np.testing.assert_allclose(result.scores, probabilities[list(classes)], atol=PROB_ATOL)
    # indices are ORIGINAL class numbers, ranked among the selected classes only
    selected = probabilities[list(classes)]
    expected_top = np.asarray(classes)[ranked(result.scores, 2)]
    np.testing.assert_array_equal(result.top_k_indices, expected_top)
    np.testing.assert_array_equal(result.argmax, np.asarray(classes)[selected.argmax(0)])
    half = engine.score(image, replace(options, dtype="float16")).maps[0]
    assert half.scores.dtype == np.float16 and half.top_k_scores.dtype == np.float16
    np.testing.assert_array_equal(half.scores, result.scores.astype(np.float16))


def test_tiles_and_stitching_give_the_single_pass_outputs(tmp_path):
    path = build_dense_model(tmp_path, with_atrous=())
    options = ScoreOptions(output_stride=2, top_k=2, argmax=True)
    image = np.random.default_rng(2).integers(0, 256, (70, 90), dtype=np.uint8)
    whole = Engine(path, config=EngineConfig(warmup=False)).score(image, options)
    engine = Engine(path, config=EngineConfig(warmup=False))
    budget = engine.estimate_request(70, 90, options).held_bytes + 20_000
    tiled_engine = Engine(path, config=EngineConfig(warmup=False, memory_budget=budget))
    tiled = tiled_engine.score(image, options)
    for name in ("scores", "top_k_indices", "argmax"):
        np.testing.assert_array_equal(getattr(tiled.maps[0], name), getattr(whole.maps[0], name))
    np.testing.assert_allclose(tiled.image_scores, whole.image_scores, rtol=1e-12)


def test_fp16_agrees_with_fp32_on_the_digits_pages():
    """fp16 weights and activations (10-bit mantissa): logits move by ~1e-3 of their
    range; on the digits pages every cell keeps its argmax, and probabilities stay within
    1e-2 (the 5e-3 measured here, doubled)."""
    engine = Engine(DIGITS / "model.onnx", config=EngineConfig(warmup=False))
    for page in sorted((DIGITS / "pages").glob("*.png")):
        data = page.read_bytes()
        exact = engine.score(data, ScoreOptions(output_stride=2, argmax=True)).maps[0]
        half = engine.score(data, ScoreOptions(output_stride=2, argmax=True, precision="fp16"))
        np.testing.assert_array_equal(half.maps[0].argmax, exact.argmax)
        assert np.abs(half.maps[0].scores - exact.scores).max() < 1e-2


def test_precision_choice_and_refusals(rgb_model):
    engine = Engine(rgb_model, config=EngineConfig(warmup=False, precision="tf32"))
    image = np.random.default_rng(4).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    logits = ScoreOptions(probabilities=False)
    # no TF32 on CPU: the tf32 default runs the exact fp32 pass
    np.testing.assert_array_equal(
        engine.score(image, logits).maps[0].scores, reference_logits(engine, image)
    )
    with pytest.raises(InvalidOption, match="bf16.*fp16"):
        engine.score(image, replace(logits, precision="bf16"))
    with pytest.raises(InvalidOption, match="precision must be one of"):
        engine.score(image, replace(logits, precision="fp8"))
    with pytest.raises(Exception, match="precision must be one of"):
        Engine(rgb_model, config=EngineConfig(warmup=False, precision="double"))


KEEP = 120_000  # arena_keep_bytes between a small and a big request of rgb_model


def test_arena_is_released_after_big_requests_only(rgb_model, monkeypatch):
    # estimates include onnxruntime's NCHWc channel padding on CPU (up to 16 channels)
    engine = Engine(rgb_model, config=EngineConfig(warmup=False, arena_keep_bytes=KEEP))
    monkeypatch.setattr(engine_module, "PROCESS_POLICY", ReleasePolicy())  # no history
    released = []
    monkeypatch.setattr(engine._runtime, "release_memory", lambda: released.append(1))
    small = np.zeros((20, 20, 3), np.uint8)
    big = np.zeros((200, 200, 3), np.uint8)
    assert engine._nets[0].estimate_bytes(20, 20) < KEEP < engine._nets[0].estimate_bytes(200, 200)
    trimmed = []
    monkeypatch.setattr(host_memory, "trim", lambda: trimmed.append(1))
    assert engine.estimate_request(20, 20).peak_bytes < KEEP
    engine.score(small)
    assert released == [] and trimmed == []
    engine.score(big)
    assert released == [1] and trimmed == [1]  # the arena, then glibc's free heap pages
    engine.score(big)  # a stream of big requests of one size keeps its buffers
    engine.score(big)
    assert released == [1] and trimmed == [1]
    # a request whose maps (not its passes) are big gives its memory back too
    maps = ScoreOptions(output_stride=1, scales=(1.0,) * 16)
    assert engine.estimate_request(30, 30, maps).peak_bytes > KEEP
    assert engine._nets[0].estimate_bytes(30, 30) < KEEP
    engine.score(np.zeros((30, 30, 3), np.uint8), maps)
    assert released == [1, 1] and trimmed == [1, 1]


def test_release_policy_keeps_a_stream_and_releases_outliers():
    policy, keep = ReleasePolicy(), 100
    decisions = [policy.should_release(peak, keep_bytes=keep) for peak in (
        50, 60,          # small: never
        400, 420, 390,   # a stream of big requests: the first releases, the rest keep
        4000,            # an outlier
        400,             # the first after it: the arena held the outlier's size
        410,             # the stream again
        50,              # smaller after big ones
        60,
    )]  # fmt: skip
    assert decisions == [False, False, True, False, False, True, True, False, True, False]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_host_memory_trim_finds_malloc_trim_in_glibc():
    function = host_memory._function()
    assert function.__name__ == "malloc_trim" and function.restype is ctypes.c_int


@pytest.mark.parametrize(("released", "expected"), [(1, True), (0, False)])
def test_host_memory_trim_calls_malloc_trim_0_and_says_if_it_released(
    monkeypatch, released, expected
):
    calls = []
    monkeypatch.setattr(host_memory, "_function", lambda: lambda pad: calls.append(pad) or released)
    assert host_memory.trim() is expected
    assert calls == [0]  # pad 0: give back every free page, keep no slack


def test_host_memory_trim_is_false_where_the_c_library_has_none(monkeypatch):
    monkeypatch.setattr(host_memory, "_function", lambda: None)
    assert host_memory.trim() is False


def test_release_memory_runs_on_the_cpu_arena(rgb_model):
    engine = Engine(rgb_model, config=EngineConfig(warmup=False))
    engine.score(np.zeros((200, 200, 3), np.uint8))
    engine._runtime.release_memory()  # must not raise: the shared arena is registered
    assert engine.score(np.zeros((20, 20, 3), np.uint8)).maps[0].cells == (3, 2)


@pytest.mark.parametrize(
    "fails, tried",
    [
        # As seen on an H200 (cuDNN 9.19): HEURISTIC finds no fp16 plan for VGG-16's 7x7
        # head conv in either layout; EXHAUSTIVE does.
        (
            lambda nhwc, search, ws: search == "HEURISTIC",
            [(1, "HEURISTIC", 0), (1, "EXHAUSTIVE", 0)],
        ),
        # No channels-last algorithm at all: NCHW, searched.
        (
            lambda nhwc, search, ws: nhwc,
            [(1, "HEURISTIC", 0), (1, "EXHAUSTIVE", 0), (0, "EXHAUSTIVE", 0)],
        ),
    ],
)
def test_fp16_cudnn_refusals_fall_back_to_safer_settings(rgb_model, monkeypatch, fails, tried):
    """cuDNN may find no algorithm for a kernel at the first pass (HEURISTIC_QUERY_FAILED on
    VGG-16's 7x7 head): the pass is retried with EXHAUSTIVE search, then in NCHW, never an
    error while a setting works. Emulated on CPU: the refused sessions fail every run."""
    from densemap.service.engine import precision as precision_module

    class FailingSession(ort.InferenceSession):
        def run_with_iobinding(self, *args, **kwargs):
            raise RuntimeError("CUDNN_FE failure: HEURISTIC_QUERY_FAILED (emulated)")

    opened = []

    def open_model_bytes(model, config, *, cuda, nhwc=False, max_workspace=False):
        setting = (int(nhwc), config.cuda_conv_search, int(max_workspace))
        opened.append(setting)
        kind = FailingSession if cuda and fails(*setting) else ort.InferenceSession
        return kind(model, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(precision_module, "open_model_bytes", open_model_bytes)
    engine = Engine(rgb_model, config=EngineConfig(warmup=False, cuda_conv_search="HEURISTIC"))
    image = np.zeros((30, 40, 3), np.uint8)
    reference = engine.score(image, FP16_OPTIONS).maps[0].scores
    for net in engine._nets:  # as on a GPU engine
        net._precisions = precision_module.PrecisionSessions(rgb_model, engine.config, on_cuda=True)
    opened.clear()
    scores = engine.score(image, FP16_OPTIONS).maps[0].scores
    np.testing.assert_array_equal(scores, reference)
    assert opened == tried
    engine.score(image, FP16_OPTIONS)
    assert opened == tried  # the working setting is kept


def test_fp16_refused_in_every_setting_is_a_clear_error(rgb_model, monkeypatch):
    from densemap.service.engine import precision as precision_module

    class FailingSession(ort.InferenceSession):
        def run_with_iobinding(self, *args, **kwargs):
            raise RuntimeError("CUDNN_FE failure: no execution plans (emulated)")

    monkeypatch.setattr(
        precision_module,
        "open_model_bytes",
        lambda model, config, *, cuda, nhwc=False, max_workspace=False: FailingSession(
            model, providers=["CPUExecutionProvider"]
        ),
    )
    engine = Engine(rgb_model, config=EngineConfig(warmup=False))
    for net in engine._nets:
        net._precisions = precision_module.PrecisionSessions(rgb_model, engine.config, on_cuda=True)
    with pytest.raises(ModelLoadError, match="no execution plans"):
        engine.score(np.zeros((30, 40, 3), np.uint8), FP16_OPTIONS)


FP16_OPTIONS = ScoreOptions(precision="fp16")


def test_serve_caps_malloc_arenas_unless_the_environment_does(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert host_memory.limit_arenas() is False  # the operator's setting wins
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    assert host_memory.limit_arenas() is True  # glibc: mallopt(M_ARENA_MAX, 2) accepted


def test_precision_report_of_a_model_that_ends_in_a_softmax(tmp_path):
    """Such a model has no logits to return: its own probabilities are compared (the load
    used to fail with 'logits cannot be returned' wherever fp16 was reported, e.g. CUDA)."""
    path = build_dense_model(tmp_path, channels=1, classes=3, output_kind="probabilities")
    engine = Engine(path, config=EngineConfig(report_precisions=("fp16",)))
    (report,) = engine.precision_report
    assert report.precision == "fp16" and report.argmax_agreement > 0.9
    assert 0 < report.max_probability_deviation < 1e-2
