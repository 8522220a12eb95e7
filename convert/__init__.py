"""densemap's converter: window classifier -> exact fully-convolutional ONNX model.

Public API (``import densemap.convert as convert`` never imports torch; the torch entry points do, lazily):

- :func:`convert_torch` — a torch ``nn.Module`` classifier to a dense ONNX file;
- :func:`convert_onnx` — a fixed-size ONNX classifier (any framework) to a dense ONNX file;
- :func:`verify` — compare a written dense model with its classifier: its own head on each
  window of its own trunk's output (exact with padding), and crop by crop;
- :func:`fully_convolutional` — the torch-side rewrite alone (returns an ``nn.Module``);
- :class:`HeadOptions` — kinds, labels, primary head and names of a classifier's heads
  (a torch forward returning a tuple or dict, an ONNX graph with several outputs: one
  dense map per output, see :mod:`densemap.convert.heads`).

Both converters end in :func:`densemap.convert.pipeline.finish_dense`: geometry from the graph,
à-trous variants, the metadata contract of :mod:`densemap.service.contract`, onnx.checker, one
onnxruntime run, then an atomic write (nothing is left at the output path on failure).
"""

from __future__ import annotations

import os
from pathlib import Path

# Imported eagerly: a lazy ``from densemap.convert.verify import ...`` would rebind ``densemap.convert.verify``
# to the submodule and shadow this function. verify.py imports no torch at module level.
from densemap.convert.verify import VerifyReport, verify

__all__ = [
    "VerifyReport",
    "ConversionResult",
    "HeadOptions",
    "convert_onnx",
    "convert_torch",
    "fully_convolutional",
    "load_onnx_classifier",
    "verify",
]


def convert_torch(
    model,
    output: str | os.PathLike,
    *,
    input_size,
    in_channels: int | None = None,
    labels=(),
    preprocessing=None,
    strides=(),
    source: str = "",
    heads=None,
    random_weights: bool = False,
    int8_calibration: str | os.PathLike | None = None,
):
    """Convert a torch classifier trained on ``input_size`` windows; returns a
    :class:`~densemap.convert.pipeline.ConversionResult`. Needs ``pip install 'densemap[convert]'``.

    A forward returning a tuple or dict of tensors gives one dense head per output;
    ``heads`` (a :class:`densemap.convert.heads.HeadOptions`) names their kinds, labels, the primary
    head and, for a tuple, the heads' names. ``labels`` are the primary head's.
    ``random_weights=True`` records in the metadata that ``model`` was never trained.
    ``int8_calibration``: a folder of images; also write int8 copies (:mod:`densemap.convert.int8`).
    ``preprocessing`` is required, as for :func:`convert_onnx` (a module carries no
    normalisation either): a ``Preprocessing``, a preset or a JSON file's path."""
    from densemap.convert.export import export_onnx
    from densemap.convert.from_onnx.global_windows import globalize_at_window
    from densemap.convert.from_torch.fc import convert_classifier
    from densemap.convert.heads import HeadOptions
    from densemap.convert.pipeline import finish_dense
    from densemap.convert.preprocessing import MISSING_ARGUMENT
    from densemap.service.errors import ConversionError

    if preprocessing is None:  # never guessed: say how pixels become the model's input
        raise ConversionError(MISSING_ARGUMENT)
    heads = heads or HeadOptions()
    conversion = convert_classifier(model, input_size=input_size, in_channels=in_channels)
    dense = export_onnx(
        conversion.ordered_module(),
        input_size=conversion.input_size,
        in_channels=conversion.in_channels,
        output_names=conversion.head_names(heads.names),
    )
    # windows that see one cell at R read it alone, as the classifier does (the ONNX path
    # rewrites its classifier so before reading the head)
    globalize_at_window(dense, window=conversion.input_size)
    return finish_dense(
        dense,
        output,
        window=conversion.input_size,
        preprocessing=preprocessing,
        labels=labels,
        source=source or f"torch:{type(model).__name__}",
        strides=strides,
        heads=heads,
        random_weights=random_weights,
        int8_calibration=int8_calibration,
    )


def load_onnx_classifier(path: str | os.PathLike):
    """Read an ONNX file, turning every read failure into a clear ConversionError."""
    import onnx

    from densemap.service.errors import ConversionError

    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"cannot read {path}: no such file")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # DecodeError, OSError, missing external data...
        raise ConversionError(
            f"{path} is not a readable ONNX model (truncated or corrupt?): {exc}"
        ) from None
    if not model.graph.node:
        raise ConversionError(f"{path} holds no ONNX graph (empty, truncated or not ONNX)")
    return model


def convert_onnx(
    path: str | os.PathLike,
    output: str | os.PathLike,
    *,
    flatten_order: str = "auto",
    labels=(),
    preprocessing=None,
    strides=(),
    heads=None,
    int8_calibration: str | os.PathLike | None = None,
):
    """Convert a fixed-size ONNX classifier; the window R is its input size. Every graph
    output is a head, named as in the graph; ``heads`` (a
    :class:`densemap.convert.heads.HeadOptions`) names kinds, labels and the primary head.
    ``preprocessing`` is required: a :class:`~densemap.service.contract.Preprocessing`, a preset
    (``"imagenet"``, ``"caffe"``, ``"unit"``, ``"none"``: :mod:`densemap.convert.preprocessing`) or
    a JSON file's path. ``int8_calibration``: a folder of images; also write int8 copies
    (:mod:`densemap.convert.int8`)."""
    from densemap.convert.from_onnx.fc_head import classifier_window, rewrite_fc_head
    from densemap.convert.pipeline import finish_dense
    from densemap.convert.preprocessing import MISSING_ARGUMENT
    from densemap.service.errors import ConversionError

    if preprocessing is None:  # an ONNX graph carries no normalisation: never guess it
        raise ConversionError(MISSING_ARGUMENT)
    model = load_onnx_classifier(path)
    window = classifier_window(model)
    dense = rewrite_fc_head(model, flatten_order=flatten_order)
    return finish_dense(
        dense,
        output,
        window=window,
        preprocessing=preprocessing,
        labels=labels,
        source=Path(path).name,
        strides=strides,
        heads=_onnx_heads(heads),
        int8_calibration=int8_calibration,
    )


def _onnx_heads(heads):
    """An ONNX classifier's outputs are named in its graph: names cannot be given."""
    from densemap.service.errors import ConversionError

    if heads is not None and heads.names:
        raise ConversionError(
            "head names apply to a torch forward that returns a tuple; an ONNX classifier's "
            "heads are its graph's output names"
        )
    return heads


def __getattr__(name: str):
    if name == "fully_convolutional":
        from densemap.convert.from_torch.fc import fully_convolutional

        return fully_convolutional
    if name == "HeadOptions":
        from densemap.convert.heads import HeadOptions

        return HeadOptions
    if name == "ConversionResult":
        from densemap.convert.pipeline import ConversionResult

        return ConversionResult
    raise AttributeError(f"module 'convert' has no attribute {name!r}")
