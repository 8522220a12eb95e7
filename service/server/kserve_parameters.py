"""KServe request parameters -> engine ScoreOptions, strictly typed.

tritonclient maps Python values to parameters as str -> string_param, bool -> bool_param,
int -> int64_param, float -> double_param. An unknown name is INVALID_ARGUMENT listing the
known ones; tritonclient's reserved names (sequence_id, priority, ...) are ignored.
"""

from __future__ import annotations

from densemap.service.engine.options import (
    DEFAULT_DETECTION_THRESHOLD,
    DEFAULT_IMAGE_TOP_K,
    DEFAULT_MAX_DETECTIONS,
    DEFAULT_NMS_IOU,
    DetectionOptions,
    ScoreOptions,
)
from densemap.service.errors import InvalidOption
from densemap.service.plain_numbers import parse_decimal, parse_integer

PARAMETERS = {
    "output_stride": "int: output stride in pixels (default: the model's native stride)",
    "scales": 'string: comma-separated image scales, e.g. "1,1.5" (default "1")',
    "probabilities": "bool: softmax per cell (true, default) or raw logits (false)",
    "top_k": "int: per-cell top-k classes (default 0 = off)",
    "dtype": 'string: "fp32" (default) or "fp16" for score maps',
    "classes": 'string: comma-separated class indices to keep in the map, e.g. "3,7"',
    "image_top_k": f"int: image-level top-k reported (default {DEFAULT_IMAGE_TOP_K})",
    "precision": 'string: "fp32" (exact), "tf32", "fp16" or "int8" (models with int8 '
    "copies) (default: the model's own)",
    "detections": "bool: also return boxes (outputs detections, detection_labels, "
    "detection_cells; default false)",
    "detection_threshold": f"double: minimum class probability of a box "
    f"(default: the model's, else {DEFAULT_DETECTION_THRESHOLD})",
    "detection_iou": f"double: NMS IoU above which a worse box of its class is dropped "
    f"(default: the model's, else {DEFAULT_NMS_IOU})",
    "detection_max_count": f"int: at most this many boxes (default: the model's, else "
    f"{DEFAULT_MAX_DETECTIONS})",
    "detection_classes": "string: comma-separated class indices to detect (default: all but "
    '"background")',
    "detection_across_classes": "bool: NMS over all classes at once (default: the model's, "
    "else false)",
    "box_offsets": 'string: "dx1,dy1,dx2,dy2" added to the window box, in window sizes '
    "(default: the model's)",
}
DETECTION_PARAMETERS = tuple(name for name in PARAMETERS if "detection" in name) + ("box_offsets",)
RESERVED = frozenset(
    (
        "sequence_id",
        "sequence_start",
        "sequence_end",
        "priority",
        "timeout",
        "headers",
        "binary_data_output",
    )
)
DTYPES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16"}


def _typed(name: str, parameter, kinds: tuple[str, ...]):
    kind = parameter.WhichOneof("parameter_choice")
    if kind not in kinds:
        raise InvalidOption(
            f"parameter {name!r} must be {PARAMETERS[name]}; got {kind or 'an empty parameter'}"
        )
    return getattr(parameter, kind)


def _int(name: str, parameter) -> int:
    return int(_typed(name, parameter, ("int64_param", "uint64_param")))


def _numbers(name: str, parameter, cast, kinds: tuple[str, ...]) -> tuple:
    value = _typed(name, parameter, ("string_param", *kinds))
    if not isinstance(value, str):
        return (cast(value),)
    parse = parse_decimal if cast is float else parse_integer  # no "1_0" or "١"
    try:
        numbers = tuple(parse(item) for item in value.split(",") if item.strip())
    except ValueError:
        raise InvalidOption(
            f"parameter {name!r} must be {PARAMETERS[name]}; got {value!r}"
        ) from None
    if not numbers:
        raise InvalidOption(f"parameter {name!r} is empty: {PARAMETERS[name]}")
    return numbers


def _detection_options(parameters) -> DetectionOptions | None:
    """DetectionOptions when ``detections`` is true; detection settings without it are refused."""
    enabled = "detections" in parameters and bool(
        _typed("detections", parameters["detections"], ("bool_param",))
    )
    settings = [
        name for name in DETECTION_PARAMETERS if name in parameters and name != "detections"
    ]
    if not enabled:
        if settings:
            raise InvalidOption(
                f"parameter(s) {settings} apply to detections: also send detections=true"
            )
        return None
    values: dict = {}
    for name, field in (("detection_threshold", "threshold"), ("detection_iou", "iou")):
        if name in parameters:
            values[field] = float(_typed(name, parameters[name], ("double_param", "int64_param")))
    if "detection_max_count" in parameters:
        values["max_count"] = _int("detection_max_count", parameters["detection_max_count"])
    if "detection_classes" in parameters:
        values["classes"] = _numbers(
            "detection_classes", parameters["detection_classes"], int, ("int64_param",)
        )
    if "detection_across_classes" in parameters:
        values["across_classes"] = bool(
            _typed(
                "detection_across_classes", parameters["detection_across_classes"], ("bool_param",)
            )
        )
    if "box_offsets" in parameters:
        values["box_offsets"] = _numbers("box_offsets", parameters["box_offsets"], float, ())
    return DetectionOptions(**values)


def options_from_parameters(parameters) -> ScoreOptions:
    """The ScoreOptions a ModelInferRequest's ``parameters`` map asks for."""
    unknown = sorted(name for name in parameters if name not in PARAMETERS and name not in RESERVED)
    if unknown:
        known = "; ".join(f"{name} ({doc})" for name, doc in PARAMETERS.items())
        raise InvalidOption(f"unknown parameter(s) {unknown[:5]}; known parameters: {known}")
    options: dict = {}
    if "output_stride" in parameters:
        stride = _int("output_stride", parameters["output_stride"])
        if stride < 0:  # 0 is the wire's "native"; ScoreOptions checks the others
            raise InvalidOption(
                f"parameter 'output_stride' must be {PARAMETERS['output_stride']}, 0 or more; "
                f"got {stride}"
            )
        options["output_stride"] = stride or None
    if "scales" in parameters:
        options["scales"] = _numbers(
            "scales", parameters["scales"], float, ("double_param", "int64_param")
        )
    if "probabilities" in parameters:
        options["probabilities"] = bool(
            _typed("probabilities", parameters["probabilities"], ("bool_param",))
        )
    if "top_k" in parameters:
        options["top_k"] = _int("top_k", parameters["top_k"])
    if "image_top_k" in parameters:
        options["image_top_k"] = _int("image_top_k", parameters["image_top_k"])
    if "dtype" in parameters:
        value = _typed("dtype", parameters["dtype"], ("string_param",))
        if value.lower() not in DTYPES:
            raise InvalidOption(f"parameter 'dtype' must be {PARAMETERS['dtype']}; got {value!r}")
        options["dtype"] = DTYPES[value.lower()]
    if "precision" in parameters:
        options["precision"] = _typed("precision", parameters["precision"], ("string_param",))
    if "classes" in parameters:
        options["classes"] = _numbers("classes", parameters["classes"], int, ("int64_param",))
    detections = _detection_options(parameters)
    if detections is not None:
        options["detections"] = detections
    return ScoreOptions(**options)  # checks the values, naming the field
