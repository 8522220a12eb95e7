"""Export torch modules to ONNX, in memory and quietly.

- :func:`export_onnx` exports a fully-convolutional module (from
  :func:`densemap.convert.from_torch.fc.fully_convolutional`) with the torch.export-based exporter
  (``dynamo=True``) and dynamic batch, height and width.
- :func:`export_classifier_onnx` exports an original fixed-size classifier with either
  exporter, as users do before ``densemap convert MODEL.onnx``: the legacy TorchScript
  exporter writes ``Flatten -> Gemm``, the dynamo exporter ``Reshape -> Gemm`` (or
  ``MatMul + Add``).

Both return an ``onnx.ModelProto`` with every weight inline. Protobuf cannot serialize a
message over 2 GB, so the caller saves big models with external data::

    if needs_external_data(proto):
        onnx.save_model(proto, path, save_as_external_data=True, location=name + ".data")
    else:
        onnx.save_model(proto, path)
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from collections.abc import Sequence

import onnx
import torch
from torch import nn

from densemap.convert.from_torch.trace import normalize_size
from densemap.service.errors import ConversionError

PROTOBUF_LIMIT = 2**31 - 1
# Headroom for the graph itself when deciding whether weights fit inline.
EXTERNAL_DATA_THRESHOLD = PROTOBUF_LIMIT - 64 * 2**20
NOISY_LOGGERS = ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript")


def export_onnx(
    module: nn.Module,
    *,
    input_size: tuple[int, int] | int,
    in_channels: int,
    dtype: torch.dtype = torch.float32,
    input_name: str = "input",
    output_name: str = "scores",
    output_names: Sequence[str] = (),
    dynamic: bool = True,
) -> onnx.ModelProto:
    """Export a fully-convolutional module; batch, height and width stay dynamic
    (named ``batch``, ``height``, ``width``) unless ``dynamic=False``. A module returning a
    tuple of maps (several heads) names them ``output_names``, in order."""
    dynamic_shapes = ({0: "batch", 2: "height", 3: "width"},) if dynamic else None
    return _export(
        module, input_size=input_size, in_channels=in_channels, dtype=dtype,
        input_name=input_name, output_names=tuple(output_names) or (output_name,),
        dynamo=True, dynamic_shapes=dynamic_shapes,
    )  # fmt: skip


def export_classifier_onnx(
    model: nn.Module,
    *,
    input_size: tuple[int, int] | int,
    in_channels: int,
    dynamo: bool,
    dtype: torch.dtype = torch.float32,
    input_name: str = "input",
    output_name: str = "logits",
    output_names: Sequence[str] = (),
    dynamic_batch: bool = True,
) -> onnx.ModelProto:
    """Export an original fixed-size classifier (input ``input_size``), with a dynamic batch
    axis unless ``dynamic_batch=False``. ``dynamo`` picks the exporter. A classifier with
    several outputs (a tuple, or a dict: its values in order) names them ``output_names``."""
    dynamic_shapes = ({0: "batch"},) if dynamic_batch and dynamo else None
    return _export(
        model, input_size=input_size, in_channels=in_channels, dtype=dtype,
        input_name=input_name, output_names=tuple(output_names) or (output_name,),
        dynamo=dynamo, dynamic_shapes=dynamic_shapes, dynamic_batch=dynamic_batch,
    )  # fmt: skip


def needs_external_data(model: onnx.ModelProto) -> bool:
    """Whether ``model``'s weights are too big for one protobuf message (2 GB)."""
    weight_bytes = sum(
        len(tensor.raw_data) or tensor.ByteSize() for tensor in model.graph.initializer
    )
    return weight_bytes > EXTERNAL_DATA_THRESHOLD


def _export(
    module, *, input_size, in_channels, dtype, input_name, output_names, dynamo,
    dynamic_shapes, dynamic_batch=True,
) -> onnx.ModelProto:  # fmt: skip
    size = normalize_size(input_size)
    module = _eval_copy(module, dtype)
    reference = next(iter(module.parameters()), None)
    device = reference.device if reference is not None else torch.device("cpu")
    # A batch of 2: torch.export specializes axes whose example size is 0 or 1.
    example = torch.rand((2, in_channels, *size), dtype=dtype, device=device)
    with _quiet():
        try:
            if dynamo:
                program = torch.onnx.export(
                    module, (example,), dynamo=True, external_data=False, verbose=False,
                    input_names=[input_name], output_names=list(output_names),
                    dynamic_shapes=dynamic_shapes,
                )  # fmt: skip
                return program.model_proto
            buffer = io.BytesIO()
            axes = {name: {0: "batch"} for name in (input_name, *output_names)}
            torch.onnx.export(
                module, (example,), buffer, dynamo=False, verbose=False,
                input_names=[input_name], output_names=list(output_names),
                dynamic_axes=axes if dynamic_batch else None,
            )  # fmt: skip
            return onnx.load_from_string(buffer.getvalue())
        except ConversionError:
            raise
        except Exception as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            exporter = "dynamo (torch.export)" if dynamo else "legacy TorchScript"
            raise ConversionError(
                f"ONNX export with the {exporter} exporter failed at input size "
                f"{size[0]}x{size[1]} ({type(exc).__name__}: {first_line[:300]}). Check that "
                "the model runs at this size; the other exporter may succeed."
            ) from None


def _eval_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``module`` in eval mode and ``dtype``; copied only when that changes it, so the
    caller's module is never modified."""
    if not isinstance(module, nn.Module):
        raise ConversionError(f"expected a torch nn.Module, got {type(module).__name__}")
    floating = [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
    in_training = any(m.training for m in module.modules())
    if in_training or any(t.dtype != dtype for t in floating):
        module = copy.deepcopy(module).to(dtype).eval()
    return module


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' progress prints, warnings and log lines."""
    loggers = [logging.getLogger(name) for name in NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
