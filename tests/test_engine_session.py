"""onnxruntime session settings that exactness and many-shape serving depend on."""

from service.engine.options import EngineConfig
from service.engine.session import cuda_provider_options, session_options


def test_cuda_defaults_are_exact_and_memory_safe():
    options = cuda_provider_options()
    # onnxruntime turns TF32 on by default; it changed GPU maps by ~3e-4 of the logit range
    # on an H200 (README "GPU"), so it stays off unless EngineConfig(tf32=True).
    assert options["use_tf32"] == "0"
    assert cuda_provider_options(tf32=True)["use_tf32"] == "1"
    # HEURISTIC took cuDNN's first pick for VGG-16's 7x7 head conv at 2048² on an H200: an
    # algorithm with a 71 GB workspace that the arena kept, so the next session ran out of
    # memory. EXHAUSTIVE within a capped workspace was faster too (113 vs 130 ms).
    assert options["cudnn_conv_algo_search"] == "EXHAUSTIVE"
    assert options["cudnn_conv_use_max_workspace"] == "0"
    assert EngineConfig().cuda_conv_search == "EXHAUSTIVE"
    assert options["arena_extend_strategy"] == "kSameAsRequested"


def test_session_threads_follow_the_config():
    assert session_options(EngineConfig(intra_op_threads=3)).intra_op_num_threads == 3
    assert EngineConfig().tf32 is False
