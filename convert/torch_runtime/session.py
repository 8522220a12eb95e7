"""The torch runtime: a model's dense ONNX graph run by torch, behind the same Engine API.

``EngineConfig(runtime="torch")`` (``densemap serve --runtime torch``, or ``"runtime":
"torch"`` in a model's densemap.json) runs the dense net in torch instead of onnxruntime:
cuDNN convolutions with torch's per-shape algorithm search (``cudnn.benchmark``, bounded by
``cudnn.benchmark_limit``), channels-last tensors on CUDA, and for fp16 a ``.half()`` copy
of the weights (tensor cores). The preprocess and postprocess graphs stay onnxruntime's
(:mod:`densemap.service.engine.graphs`): tensors cross between the two through DLPack, without a
copy, on the device (:meth:`TorchSession.run_ortvalues`).

The graph is evaluated op by op (:mod:`densemap.convert.torch_runtime.ops`, onnxruntime's
semantics; onnx2torch, the converter library, pulls torchvision, whose builds must match
torch's exactly). A model with an op outside that set is refused at load, naming the op.
fp32 is exact as onnxruntime's CPU fp32 is (maps equal to float32 rounding,
tests/engine/test_runtime_torch.py); TF32 stays off unless a request asks for ``tf32``.

torch is imported by :func:`open_torch_net`, on demand (:func:`densemap.convert.torch_runtime.ops.load`).
"""

from __future__ import annotations

import logging
import threading
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
from onnx import helper, numpy_helper

from densemap.convert.torch_runtime import ops
from densemap.service.engine.fc_head_unfold import applies, unfold_huge_convs
from densemap.service.engine.options import EngineConfig
from densemap.service.errors import InvalidOption, ModelLoadError

log = logging.getLogger("densemap.engine")

TORCH_MISSING = (
    "EngineConfig.runtime='torch' (--runtime torch) needs torch: pip install "
    "'densemap[torch]', or use the default runtime 'ort'"
)
TORCH_CUDA, TORCH_CPU = "TorchCUDA", "TorchCPU"
_REQUIRED = object()
_RUN_LOCK = threading.Lock()  # cuDNN's TF32 switch is process-wide: CUDA passes one by one


class _Node:
    """One ONNX node: its op, inputs, outputs and attributes as Python/torch values."""

    def __init__(self, proto, *, opset: int, float_dtype, device, to_tensor) -> None:
        self.op = proto.op_type
        self.inputs = list(proto.input)
        self.outputs = list(proto.output)
        self.opset, self.float_dtype, self.device = opset, float_dtype, device
        self._attrs = {}
        for attr in proto.attribute:
            value = helper.get_attribute_value(attr)
            if attr.type == onnx.AttributeProto.TENSOR:
                value = to_tensor(value)
            elif isinstance(value, bytes):
                value = value.decode()
            elif attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                raise ModelLoadError(f"the torch runtime has no {self.op} with subgraphs")
            self._attrs[attr.name] = value

    def attr(self, name: str, default=_REQUIRED):
        if name in self._attrs:
            return self._attrs[name]
        if default is _REQUIRED:
            raise ModelLoadError(f"{self.op} node without its {name!r} attribute")
        return default


class TorchGraph:
    """An ONNX graph evaluated by torch on ``device`` in ``float_dtype``."""

    def __init__(self, model: onnx.ModelProto, *, device, float_dtype, channels_last: bool):
        torch = ops.load()
        table = ops.table()
        unknown = sorted({n.op_type for n in model.graph.node if n.op_type not in table})
        if unknown:
            raise ModelLoadError(
                f"the torch runtime has no {', '.join(unknown)}: serve this model with "
                "--runtime ort (the default)"
            )
        opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        self._memory_format = torch.channels_last if channels_last else None
        self._device, self._float_dtype = device, float_dtype
        self.values = {init.name: self._tensor(init) for init in model.graph.initializer}
        self.nodes = [
            (table[n.op_type], _Node(n, opset=opset, float_dtype=float_dtype, device=device,
                                     to_tensor=self._tensor))
            for n in model.graph.node
        ]  # fmt: skip
        self._last_use: dict[str, int] = {}
        for index, (_, node) in enumerate(self.nodes):
            for name in node.inputs:
                self._last_use[name] = index

    def _tensor(self, proto: onnx.TensorProto):
        torch = ops.torch
        array = numpy_helper.to_array(proto)
        tensor = torch.from_numpy(np.array(array, copy=True))
        if not tensor.dtype.is_floating_point:
            return tensor  # shapes and indices: on the CPU
        tensor = tensor.to(self._device, self._float_dtype)
        if self._memory_format is not None and tensor.dim() == 4:
            tensor = tensor.contiguous(memory_format=self._memory_format)
        return tensor

    def __call__(self, feeds: dict, wanted) -> dict:
        values = dict(self.values)
        for name, tensor in feeds.items():
            tensor = tensor.to(self._device, self._float_dtype)
            if self._memory_format is not None and tensor.dim() == 4:
                tensor = tensor.contiguous(memory_format=self._memory_format)
            values[name] = tensor
        keep = set(wanted)
        for index, (op, node) in enumerate(self.nodes):
            inputs = [values[name] if name else None for name in node.inputs]
            while inputs and inputs[-1] is None:
                inputs.pop()
            result = op(node, *inputs)
            results = result if isinstance(result, tuple) else (result,)
            for name, value in zip(node.outputs, results, strict=False):
                if name:
                    values[name] = value
            for name in node.inputs:  # free what no later node reads (big activations)
                if self._last_use.get(name) == index and name not in keep and name in values:
                    if name not in self.values:
                        del values[name]
        return {name: values[name] for name in wanted}


class TorchSession:
    """The parts of ``onnxruntime.InferenceSession`` the engine uses, run by torch."""

    def __init__(self, graph: TorchGraph, proto, *, device, dtype: str, tf32: bool = False):
        initializers = {init.name for init in proto.graph.initializer}
        self._graph, self._device, self.dtype, self._tf32 = graph, device, dtype, tf32
        self._inputs = [SimpleNamespace(name=i.name) for i in proto.graph.input
                        if i.name not in initializers]  # fmt: skip
        self._outputs = [SimpleNamespace(name=o.name) for o in proto.graph.output]
        on_cuda = device.type == "cuda"
        self._providers = [TORCH_CUDA, "CUDAExecutionProvider"] if on_cuda else [TORCH_CPU]
        self._providers.append("CPUExecutionProvider")

    def get_inputs(self):
        return list(self._inputs)

    def get_outputs(self):
        return list(self._outputs)

    def get_providers(self):
        return list(self._providers)

    def _run(self, feeds: dict, outputs) -> dict:
        torch = ops.torch
        on_cuda = self._device.type == "cuda"
        flags = (
            torch.backends.cudnn.flags(enabled=True, benchmark=True, allow_tf32=self._tf32)
            if on_cuda
            else nullcontext()
        )
        with _RUN_LOCK if on_cuda else nullcontext(), flags, torch.inference_mode():
            torch.backends.cuda.matmul.allow_tf32 = self._tf32
            try:
                results = self._graph(feeds, list(outputs))
            except NotImplementedError as exc:
                raise ModelLoadError(
                    f"the torch runtime cannot run this model ({exc}): use --runtime ort"
                ) from None
            results = {name: value.contiguous() for name, value in results.items()}
            if on_cuda:  # onnxruntime's postprocess graph reads them on its own stream
                torch.cuda.current_stream().synchronize()
            return results

    def release_memory(self) -> None:
        """Give torch's cached CUDA blocks (activations, cuDNN workspaces) back to the
        device after a big request, as the onnxruntime arenas are shrunk on CPU."""
        if self._device.type == "cuda":
            ops.torch.cuda.empty_cache()

    def run(self, outputs, feeds: dict) -> list[np.ndarray]:
        """Host arrays in and out (load-time checks and warm-up)."""
        torch = ops.torch
        tensors = {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in feeds.items()}
        names = list(outputs) if outputs else [o.name for o in self._outputs]
        results = self._run(tensors, names)
        return [results[name].float().cpu().numpy() for name in names]

    def run_ortvalues(self, inputs: dict, outputs) -> dict:
        """onnxruntime values in and out, on their device, shared through DLPack."""
        import onnxruntime as ort

        torch = ops.torch
        tensors = {name: torch.from_dlpack(value) for name, value in inputs.items()}
        where = next(iter(tensors.values())).device
        results = self._run(tensors, outputs)
        return {name: ort.OrtValue.from_dlpack(value.to(where)) for name, value in results.items()}


class TorchPrecisions:
    """The fp16 (``.half()`` copy) and tf32 sessions of one torch net, made at first use."""

    def __init__(self, model: onnx.ModelProto, device, channels_last: bool) -> None:
        self._model, self._device, self._channels_last = model, device, channels_last
        self._sessions: dict[str, tuple[TorchSession, str]] = {}
        self._lock = threading.Lock()

    def session_for(self, precision: str, fp32: TorchSession):
        if precision == "fp32" or (precision == "tf32" and self._device.type != "cuda"):
            return fp32, "float32"
        if precision not in ("fp16", "tf32"):  # int8 copies are onnxruntime (QDQ) models
            raise InvalidOption(
                f"precision {precision!r} is not available with --runtime torch: serve the "
                "model with --runtime ort (the default), or use fp32, tf32 or fp16"
            )
        with self._lock:
            if precision not in self._sessions:
                torch = ops.torch
                dtype = torch.float16 if precision == "fp16" else torch.float32
                graph = TorchGraph(self._model, device=self._device, float_dtype=dtype,
                                   channels_last=self._channels_last)  # fmt: skip
                name = "float16" if precision == "fp16" else "float32"
                session = TorchSession(graph, self._model, device=self._device, dtype=name,
                                       tf32=precision == "tf32")  # fmt: skip
                self._sessions[precision] = (session, name)
            return self._sessions[precision]

    def demote(self, precision: str, error: Exception) -> bool:
        return False  # cuDNN's benchmark search finds an algorithm or fails for good


def _device(config: EngineConfig):
    torch = ops.torch
    cuda = torch.cuda.is_available()
    if config.device == "cuda" and not cuda:
        raise ModelLoadError(
            "EngineConfig(device='cuda', runtime='torch') but torch sees no CUDA device; "
            "use device='auto' to fall back to CPU"
        )
    if config.device != "cpu" and cuda:
        torch.backends.cudnn.benchmark = True  # per input shape, then cached
        torch.backends.cudnn.allow_tf32 = False  # exact fp32 unless a request asks for tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        return torch.device("cuda", 0)
    if config.intra_op_threads > 0:
        torch.set_num_threads(config.intra_op_threads)
    return torch.device("cpu")


def open_torch_net(path: Path, config: EngineConfig, *, channels_last: bool | None = None):
    """(fp32 session, precisions) of the dense ONNX model at ``path`` run by torch;
    ``channels_last`` defaults to on CUDA only."""
    try:
        ops.load()
    except ImportError:
        raise ModelLoadError(TORCH_MISSING) from None
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - protobuf DecodeError, OSError...
        raise ModelLoadError(f"{path} is not a readable ONNX model: {exc}") from None
    device = _device(config)
    cuda = device.type == "cuda"
    if applies(config.fc_head_unfold, cuda=cuda):
        unfold_huge_convs(model, min_weights=config.fc_head_unfold_min_weights)
    nhwc = cuda if channels_last is None else channels_last
    graph = TorchGraph(model, device=device, float_dtype=ops.torch.float32, channels_last=nhwc)
    session = TorchSession(graph, model, device=device, dtype="float32")
    log.info("%s: torch runtime on %s%s", path.name, device, " (channels-last)" if nhwc else "")
    return session, TorchPrecisions(model, device, nhwc)
