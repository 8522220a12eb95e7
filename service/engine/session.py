"""onnxruntime session creation: provider choice, threads, cuDNN search, arena policy.

CUDA is used only when it really loads: a session is created with the CUDA provider first
and ``session.get_providers()`` is checked afterwards (``get_available_providers()`` only
says that the package was built with CUDA). On a machine without a CUDA driver CUDA is not
tried at all, and a failed attempt is made with onnxruntime's default logger silenced, so a
CPU-only machine gets one info line instead of onnxruntime's error and warning at every
session creation. The outcome of the first attempt is remembered for the process.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from densemap.service.engine.cuda_driver import describe_driver
from densemap.service.engine.fc_head_unfold import model_source
from densemap.service.engine.onnxruntime_package import ort
from densemap.service.engine.options import EngineConfig
from densemap.service.errors import ModelLoadError

log = logging.getLogger("densemap.engine")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
ORT_DEFAULT_SEVERITY = 2  # onnxruntime's own default (warning)
_QUIET_SEVERITY = 4  # fatal only, while CUDA is tried

_cuda_state: dict[str, str | bool] = {}  # "usable": bool, "reason": str (process-wide)
_cuda_lock = threading.Lock()


def cuda_provider_options(*, tf32: bool = False, search: str = "HEURISTIC") -> dict[str, str]:
    """CUDA EP settings: cuDNN conv algorithm ``search`` (HEURISTIC by default: EXHAUSTIVE
    times every algorithm for each new input shape), an arena that grows only as requested,
    and no TF32 unless asked (onnxruntime enables it by default; it rounds conv inputs to
    10-bit mantissas, so GPU maps would differ from CPU maps). The workspace an EXHAUSTIVE
    search may try is capped (no speed difference measured). The cap does NOT stop a huge
    FC-head conv (VGG-16's 7x7 at 2048²) from taking tens of GB in the session's arena, under
    every search setting; a second session in the same process then runs out of memory
    there (docs/engine.md "GPU check" has the figures; fc_head_unfold.py avoids the workspace)."""
    return {
        "device_id": "0",
        "cudnn_conv_algo_search": search,
        "cudnn_conv_use_max_workspace": "0",
        "arena_extend_strategy": "kSameAsRequested",
        "do_copy_in_default_stream": "1",
        "use_tf32": "1" if tf32 else "0",
    }


def _preload_cuda_libraries() -> None:
    """Load CUDA/cuDNN from the nvidia-* pip packages when they are installed (no-op else)."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception as exc:  # noqa: BLE001 - system libraries may still be found
            log.debug("onnxruntime.preload_dlls() failed: %s", exc)


def session_options(config: EngineConfig) -> ort.SessionOptions:
    """Session settings shared by every model and variant."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(0, int(config.intra_op_threads))
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # One CPU arena for every session of the process: passes reuse its buffers (plain
    # malloc/free of big buffers page-faults them afresh: slower passes, docs/engine.md
    # "Measurements behind the code"), and Runtime.release_memory shrinks it after big requests, so the
    # resident memory returns to its size before. Memory patterns are planned per input
    # shape and every request has its own shape: off.
    _register_cpu_arena()
    options.add_session_config_entry("session.use_env_allocators", "1")
    options.enable_mem_pattern = False
    options.log_severity_level = 3  # no "nodes not assigned to the preferred EP" warnings
    if not config.spin_wait:  # spinning threads would take the cores other threads decode on
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


_arena_registered = False
_arena_lock = threading.Lock()


def _register_cpu_arena() -> None:
    """Register the process-wide CPU arena (growing only as requested) once."""
    global _arena_registered
    with _arena_lock:
        if _arena_registered:
            return
        info = ort.OrtMemoryInfo(
            "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
        )
        ort.create_and_register_allocator(info, ort.OrtArenaCfg({"arena_extend_strategy": 1}))
        _arena_registered = True


def release_arena_options() -> ort.RunOptions:
    """Run options that shrink the shared CPU arena to what is in use when the run ends."""
    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


def open_aux_session(model: bytes, config: EngineConfig, *, cuda: bool) -> ort.InferenceSession:
    """A session for one of the engine's own small graphs, on the model's device.

    Its threads never spin: every session has its own intra-op pool, whose idle threads
    spin-wait for more work after a run. After the preprocess graph's few milliseconds its
    threads went on spinning while the net ran, taking cores from the net's own threads
    (docs/engine.md "Measurements behind the code"). The net's session spins as
    ``config.spin_wait`` says."""
    config = replace(config, spin_wait=False)
    if cuda:
        cuda_options = (CUDA, cuda_provider_options(tf32=False))
        return _open(model, config, [cuda_options, CPU])
    return _open(model, config, [CPU])


def open_model_bytes(
    model: bytes, config: EngineConfig, *, cuda: bool, nhwc: bool = False
) -> ort.InferenceSession:
    """A session for a model the engine derived (e.g. its float16 copy).

    ``nhwc`` asks the CUDA EP for channels-last convolutions (tensor cores in fp16); when
    cuDNN refuses them (e.g. HEURISTIC_QUERY_FAILED on some kernel sizes), the session is
    opened again without them rather than failing.
    """
    if not cuda:
        try:
            return _open(model, config, [CPU])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidGraph
            raise ModelLoadError(f"onnxruntime cannot load a derived model: {exc}") from None
    options = cuda_provider_options(search=config.cuda_conv_search)
    attempts = ([{**options, "prefer_nhwc": "1"}] if nhwc else []) + [options]
    failure = "the CUDA provider did not load"
    for attempt in attempts:
        try:
            session = _open(model, config, [(CUDA, attempt), CPU])
        except Exception as exc:  # noqa: BLE001 - the next attempt, then one clear error
            failure = str(exc)
            continue
        if CUDA in session.get_providers():  # never a silent CPU fallback on a GPU engine
            return session
    raise ModelLoadError(f"onnxruntime cannot load a derived model on CUDA: {failure}")


def _has_cuda_driver() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def _open(source: str | bytes, config: EngineConfig, providers: list) -> ort.InferenceSession:
    return ort.InferenceSession(source, sess_options=session_options(config), providers=providers)


def _source(path: Path, config: EngineConfig, *, cuda: bool) -> str | bytes:
    """The file, or its bytes with huge-kernel convs unfolded (fc_head_unfold.py)."""
    return model_source(
        path, mode=config.fc_head_unfold, min_weights=config.fc_head_unfold_min_weights, cuda=cuda
    )


def _try_cuda(
    source: Callable[[], str | bytes], config: EngineConfig, *, tf32: bool
) -> ort.InferenceSession | None:
    """A session on CUDA for what ``source()`` gives (a file name or model bytes, asked for
    only when CUDA can be tried), or None (and remember why) when CUDA does not really load."""
    with _cuda_lock:
        if _cuda_state.get("usable") is False:
            return None
        if CUDA not in ort.get_available_providers():
            reason = "this onnxruntime build has no CUDA provider"
        elif not _has_cuda_driver():
            reason = "no CUDA driver (libcuda.so.1) on this machine"
        else:
            ort.set_default_logger_severity(_QUIET_SEVERITY)
            try:
                _preload_cuda_libraries()
                cuda = (
                    CUDA,
                    cuda_provider_options(tf32=tf32, search=config.cuda_conv_search),
                )
                session = _open(source(), config, [cuda, CPU])
            except Exception as exc:  # noqa: BLE001 - retried on CPU below, which reports
                session, reason = None, f"CUDA session failed: {exc}"
            finally:
                ort.set_default_logger_severity(ORT_DEFAULT_SEVERITY)
            if session is not None and CUDA in session.get_providers():
                _cuda_state["usable"] = True
                return session
            if session is not None:
                reason = "the CUDA provider did not load (CUDA 13 / cuDNN 9 libraries missing?)"
        _cuda_state.update(usable=False, reason=reason)
        return None


def create_session(path: Path, config: EngineConfig, *, tf32: bool = False) -> ort.InferenceSession:
    """An onnxruntime session for ``path`` on the device ``config.device`` asks for;
    ``tf32``: TF32 convolutions on CUDA (precision "tf32"; fp32 sessions never use them)."""
    if not path.is_file():
        raise ModelLoadError(f"model file {path} does not exist")
    if config.device in ("auto", "cuda"):
        session = _try_cuda(lambda: _source(path, config, cuda=True), config, tf32=tf32)
        if session is not None:
            return session
        if config.device == "cuda":
            raise ModelLoadError(
                f"device 'cuda' (densemap serve --device cuda, EngineConfig.device) but CUDA is "
                f"not usable: {_cuda_state['reason']} ({describe_driver()}); use device 'auto' "
                "to fall back to CPU"
            )
    try:
        return _open(_source(path, config, cuda=False), config, [CPU])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidGraph
        raise ModelLoadError(f"onnxruntime cannot load {path}: {exc}") from None


def cuda_fallback_reason() -> str | None:
    """Why CUDA is not used in this process (None if it was never tried or it works)."""
    return None if _cuda_state.get("usable") is not False else str(_cuda_state["reason"])


def _probe_model() -> bytes:
    """The smallest model that runs on CUDA: float32 Identity, opset 13."""
    from onnx import TensorProto, helper

    value = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "probe", [value], [output]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def cuda_problem(config: EngineConfig) -> str | None:
    """None when a CUDA session really opens in this process, else why not and which driver
    is needed (tried once per process, as for models: the outcome is remembered)."""
    if _try_cuda(_probe_model, config, tf32=False) is not None:
        return None
    return f"{_cuda_state['reason']} ({describe_driver()})"
