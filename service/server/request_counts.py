"""Repeated fields of a request, counted before anything converts or quotes them.

A few hundred MiB of one repeated field parse into a protobuf message in milliseconds, but
turning them into a Python tuple, a numpy array or an error message takes seconds and
gigabytes, and holds the interpreter meanwhile. So each servicer checks the counts of its
request's repeated fields here first (``len`` of a repeated field is free), and a request
over a limit is INVALID_ARGUMENT saying which field, how many, and the limit.
"""

from __future__ import annotations

from densemap.service.engine.field_checks import MAX_SCALES
from densemap.service.errors import InvalidOption

MAX_TENSOR_RANK = 8  # dimensions of any tensor a request sends (images have 2 or 3)
MAX_CLASS_INDICES = 65536  # class indices a request may list (classes, detection classes)
MAX_NAMES = 1024  # head or output names a request may list
MAX_PARAMETERS = 64  # KServe parameters per request or tensor
MAX_PARAMETER_CHARS = 65536  # length of one KServe string parameter ("1,1.5", "3,7", ...)
MAX_TYPED_CONTENTS = 1 << 22  # KServe typed contents values: 4 Mi; larger images go raw
MAX_KSERVE_TENSORS = 64  # KServe inputs, outputs or raw_input_contents entries


def check_count(count: int, limit: int, what: str, fix: str) -> None:
    """INVALID_ARGUMENT when ``count`` (a repeated field's length) exceeds ``limit``."""
    if count > limit:
        raise InvalidOption(f"{what} has {count} entries, over the limit of {limit}: {fix}")


def check_rank(count: int, what: str) -> None:
    check_count(
        count,
        MAX_TENSOR_RANK,
        f"{what}.shape",
        "an image is [H, W] or [H, W, C] (UINT8), or [C, H, W] (FLOAT32)",
    )


def check_score_request(request) -> None:
    """densemap.v1 ScoreRequest: image shape, scales, classes, heads, detection options."""
    if request.image.HasField("array"):
        check_rank(len(request.image.array.shape), "image.array")
    options = request.options
    check_count(len(options.scales), MAX_SCALES, "options.scales", f"send 1..{MAX_SCALES} scales")
    classes_fix = "list each class index once (ListModels gives the class count)"
    check_count(len(options.classes), MAX_CLASS_INDICES, "options.classes", classes_fix)
    check_count(len(options.heads), MAX_NAMES, "options.heads", "name each head once")
    detections = options.detections
    check_count(len(detections.classes), MAX_CLASS_INDICES, "detections.classes", classes_fix)
    check_count(len(detections.box_offsets), 4, "detections.box_offsets", "send dx1, dy1, dx2, dy2")


def check_infer_request(request) -> None:
    """KServe ModelInferRequest: tensors, their shapes and contents, parameters."""
    fix = "send one input, 'image' or 'image_bytes', and name each output at most once"
    for what, count in (
        ("inputs", len(request.inputs)),
        ("outputs", len(request.outputs)),
        ("raw_input_contents", len(request.raw_input_contents)),
    ):
        check_count(count, MAX_KSERVE_TENSORS, what, fix)
    check_parameters(request.parameters, "parameters")
    for index, tensor in enumerate(request.inputs):
        what = f"inputs[{index}]"
        check_rank(len(tensor.shape), what)
        check_parameters(tensor.parameters, f"{what}.parameters")
        contents = tensor.contents
        for field, values in contents.ListFields():
            check_count(
                len(values),
                MAX_TYPED_CONTENTS,
                f"{what}.contents.{field.name}",
                "send the pixels in raw_input_contents (what tritonclient's "
                "InferInput.set_data_from_numpy does)",
            )
    for index, output in enumerate(request.outputs):
        check_parameters(output.parameters, f"outputs[{index}].parameters")


def check_parameters(parameters, what: str) -> None:
    """A KServe parameter map: how many, and how long each string parameter is."""
    check_count(len(parameters), MAX_PARAMETERS, what, "send only the parameters you need")
    for name, parameter in parameters.items():
        if parameter.WhichOneof("parameter_choice") != "string_param":
            continue
        size = parameter.ByteSize()  # no copy of the string, unlike len(string_param)
        if size > MAX_PARAMETER_CHARS:
            raise InvalidOption(
                f"{what}[{name[:80]!r}] is a string of about {size} bytes, over the limit "
                f"of {MAX_PARAMETER_CHARS}: send short comma-separated lists (at most "
                f"{MAX_SCALES} scales)"
            )
