"""onnxruntime session settings that exactness and many-shape serving depend on."""

from densemap.service.engine.options import EngineConfig
from densemap.service.engine.session import cuda_provider_options, session_options


def test_cuda_defaults_are_exact_and_shape_friendly():
    options = cuda_provider_options()
    # onnxruntime turns TF32 on by default; it changed GPU maps by ~3e-4 of the logit range
    # on an H200 (README "GPU"), so it stays off unless a pass runs at precision "tf32".
    assert options["use_tf32"] == "0"
    assert cuda_provider_options(tf32=True)["use_tf32"] == "1"
    # EXHAUSTIVE search made VGG-16's first request of a new shape 3-9x its steady time on an
    # H200 (HEURISTIC: 1.1-1.9x); dense serving sees many shapes.
    assert options["cudnn_conv_algo_search"] == "HEURISTIC"
    assert EngineConfig().cuda_conv_search == "HEURISTIC"
    # onnxruntime's default lets a conv's workspace take what is free; capped here.
    assert options["cudnn_conv_use_max_workspace"] == "0"
    assert options["arena_extend_strategy"] == "kSameAsRequested"


def test_session_threads_follow_the_config():
    assert session_options(EngineConfig(intra_op_threads=3)).intra_op_num_threads == 3
    assert EngineConfig().precision == "fp32"  # tf32 is a precision, not a switch of its own
