"""Where passes run: tensors kept on the model's device between graphs (IO binding).

A :class:`Runtime` belongs to one engine. It uploads each (resized) image once, in its
smallest form (uint8 HxWxC: a quarter of float32's bytes), then for every pass or tile runs
three graphs back to back on the device: the preprocess graph cuts and normalises the
region, the net computes the raw map, the postprocess graph computes what the caller asked
for. Only those outputs come back to the host (see :mod:`densemap.service.engine.graphs`).

On CPU the same graphs run on the CPU execution provider, with one shared arena allocator
(fast reuse of activation buffers between passes); :meth:`Runtime.release_memory` gives the
arena's free memory back to the system after a request bigger than
``EngineConfig.arena_keep_bytes``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from densemap.service.contract import Preprocessing
from densemap.service.engine import graphs
from densemap.service.engine.onnxruntime_package import ort
from densemap.service.engine.options import EngineConfig
from densemap.service.engine.session import CUDA, open_aux_session, release_arena_options

# The small graphs depend only on their spec and the device: one session per process, shared
# by every engine (a repository of many models, reloads) instead of one per engine.
_SESSIONS: dict[object, ort.InferenceSession] = {}
_SESSIONS_LOCK = threading.Lock()


def _bind_inputs(session, device_inputs: dict, host_inputs: dict) -> ort.IOBinding:
    """An IO binding of ``session`` with tensors already on the device and host arrays."""
    binding = session.io_binding()
    for name, value in device_inputs.items():
        binding.bind_ortvalue_input(name, value)
    for name, array in host_inputs.items():
        binding.bind_cpu_input(name, array)
    return binding


class Runtime:
    """Uploads, the preprocess/postprocess graphs, and the run calls of one engine."""

    def __init__(self, *, providers: Sequence[str], config: EngineConfig) -> None:
        self.on_cuda = CUDA in providers
        self.device_type = "cuda" if self.on_cuda else "cpu"
        self._config = config
        self._session_key = (self.on_cuda, config.intra_op_threads, config.spin_wait)

    # -- graphs ----------------------------------------------------------------------------
    def _session(self, key, build) -> ort.InferenceSession:
        key = (*self._session_key, key)
        with _SESSIONS_LOCK:
            session = _SESSIONS.get(key)
            if session is None:
                session = open_aux_session(build(), self._config, cuda=self.on_cuda)
                _SESSIONS[key] = session
            return session

    def preprocess_session(
        self, preprocessing: Preprocessing, *, source: str, layout: str, dtype: str
    ) -> ort.InferenceSession:
        key = ("pre", preprocessing, source, layout, dtype)
        return self._session(
            key,
            lambda: graphs.preprocess_graph(
                preprocessing, source=source, layout=layout, dtype=dtype
            ),
        )

    def postprocess_session(self, spec: graphs.PostprocessSpec) -> ort.InferenceSession:
        return self._session(("post", spec), lambda: graphs.postprocess_graph(spec))

    def head_session(self, spec: graphs.HeadSpec) -> ort.InferenceSession:
        return self._session(("head", spec), lambda: graphs.head_graph(spec))

    # -- tensors ---------------------------------------------------------------------------
    def upload(self, array: np.ndarray) -> ort.OrtValue:
        """A C-contiguous copy of ``array`` on the device (on CPU: the array itself)."""
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device_type, 0)

    def run_to_device(
        self,
        session: ort.InferenceSession,
        device_inputs: dict[str, ort.OrtValue],
        host_inputs: dict[str, np.ndarray],
        output: str,
    ) -> ort.OrtValue:
        """Run ``session``; its one output ``output`` stays on the device."""
        if hasattr(session, "run_ortvalues"):  # a net in the torch runtime (convert/torch_runtime/)
            return session.run_ortvalues(device_inputs, [output])[output]
        binding = _bind_inputs(session, device_inputs, host_inputs)
        binding.bind_output(output, self.device_type, 0)
        session.run_with_iobinding(binding)
        return binding.get_outputs()[0]

    def run_outputs_to_device(
        self,
        session: ort.InferenceSession,
        device_inputs: dict[str, ort.OrtValue],
        outputs: Sequence[str],
    ) -> dict[str, ort.OrtValue]:
        """Run ``session``; its ``outputs`` (only those: a model's heads the request did not
        ask for are not bound) stay on the device."""
        binding = _bind_inputs(session, device_inputs, {})
        for name in outputs:
            binding.bind_output(name, self.device_type, 0)
        session.run_with_iobinding(binding)
        return dict(zip(outputs, binding.get_outputs(), strict=True))

    def run_to_host(
        self,
        session: ort.InferenceSession,
        device_inputs: dict[str, ort.OrtValue],
        host_inputs: dict[str, np.ndarray],
        outputs: Sequence[str],
    ) -> dict[str, np.ndarray]:
        """Run ``session``; copy only ``outputs`` to host memory."""
        binding = _bind_inputs(session, device_inputs, host_inputs)
        for name in outputs:
            binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding)
        return dict(zip(outputs, binding.copy_outputs_to_cpu(), strict=True))

    def release_memory(self) -> None:
        """Give the CPU arena's unused memory back to the system (after a big request)."""
        if self.on_cuda:
            return
        spec = graphs.PostprocessSpec()
        session = self.postprocess_session(spec)
        raw = np.zeros((1, 1, 1, 1), dtype=np.float32)
        cells = np.array([0, 0], np.int64), np.array([1, 1], np.int64)
        session.run(
            [graphs.PROB_SUM],
            {graphs.RAW: raw, graphs.STARTS: cells[0], graphs.ENDS: cells[1]},
            release_arena_options(),
        )  # fmt: skip
