"""What one request costs, known from the image size and the options before any work.

``Engine.estimate_request(height, width, options)`` returns a :class:`RequestCost`; the
engine checks it before decoding pixels and the server before admitting a call, so a
request that cannot be served is refused in milliseconds, not after minutes of passes.

Counted, per request (bytes; docs/engine.md "Request cost"):

- ``map_bytes``: every array the engine returns, over all scales (score map of the selected
  classes in the map dtype, per-cell top-k values and int32 indices, int32 argmax, the
  map of each extra head returned in the map dtype).
- ``held_bytes``: what stays resident while the passes run: the image (decoded uint8, or
  the float array given), every scale's maps, and the largest resized image.
- ``activation_bytes``: the peak bytes of one pass after tiling: its activations
  (``memory.py``) plus its copies (:func:`pass_copies`: the raw map's postprocess
  temporaries, twice its size, and its outputs twice: onnxruntime's buffer, the host copy).
  Tiles are sized so that both fit.
- ``macs``: the multiply-accumulates of every pass (Conv, Gemm, MatMul nodes at the
  scale's size, times the k x k shifts of a finer stride; shifted passes are a few cells
  smaller and tiles overlap, so this is the compute of the untiled passes, rounded up to
  whole shifts), what the server's compute limit admits.
- ``response_bytes``: a lower bound of the densemap.v1 response's wire size (its arrays,
  image scores and top-k); the server refuses what surely exceeds its message limit.

The memory budget covers all of it: on CPU, maps, copies and activations share the host
memory, so a pass may use only the budget that the held bytes leave (``activation_budget``)
and is tiled into it; on CUDA the activations live on the device and have the whole budget,
while the held host bytes are checked against the same figure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from densemap.service.contract import Pair
from densemap.service.engine.heads import head_key
from densemap.service.engine.postprocess import OutputPlan

RAW_COPIES = 2  # postprocess temporaries of a pass's raw map (exp, then the probabilities)
OUTPUT_COPIES = 2  # a pass's outputs: onnxruntime's output buffer, then the host copy
MAP_HEADER_BYTES = 16  # at least this much per map besides its arrays (shape, geometry)
TOP_K_ENTRY_BYTES = 8  # at least this much per image top-k entry (index and score)
ENCODING_COPIES = 2  # a response while it is sent: the message, then its serialized bytes


@dataclass(frozen=True)
class ScaleCost:
    """One scale's map: its image size, cells and bytes."""

    scale: float
    size: Pair  # (h, w) of the image at this scale
    cells: Pair  # (n_h, n_w) of its map
    outputs: Mapping[str, int]  # bytes of each returned array (scores, top_k_*, argmax)
    working_bytes: int  # the resized image
    pass_bytes: int = 0  # one untiled pass at this scale: activations and pass copies
    macs: int = 0  # multiply-accumulates of this scale's passes (all k x k shifts)

    @property
    def map_bytes(self) -> int:
        return sum(self.outputs.values())


@dataclass(frozen=True)
class RequestCost:
    """The bytes one request needs; see the module docstring for what each one counts."""

    image_size: Pair
    image_bytes: int
    scales: tuple[ScaleCost, ...]
    response_bytes: int
    activation_bytes: int  # peak bytes of one pass (activations and copies), after tiling
    activation_budget: int  # what one pass may use: the budget less held_bytes on CPU
    budget: int

    @property
    def map_bytes(self) -> int:
        return sum(scale.map_bytes for scale in self.scales)

    @property
    def held_bytes(self) -> int:
        return held_bytes(self.image_bytes, self.scales)

    @property
    def macs(self) -> int:
        """Multiply-accumulates of every pass of every scale."""
        return sum(scale.macs for scale in self.scales)

    @property
    def peak_bytes(self) -> int:
        """Held bytes plus the activations of one pass (on CUDA those are device memory)."""
        return self.held_bytes + self.activation_bytes

    def sending_bytes(self, response_bytes: int | None = None) -> int:
        """Host bytes while the server encodes and sends the response: the image, the maps,
        the response message and its serialized copy."""
        size = self.response_bytes if response_bytes is None else response_bytes
        return self.image_bytes + self.map_bytes + ENCODING_COPIES * size


def held_bytes(image_bytes: int, scales: tuple[ScaleCost, ...]) -> int:
    working = max((scale.working_bytes for scale in scales), default=0)
    return image_bytes + sum(scale.map_bytes for scale in scales) + working


def output_bytes(plan: OutputPlan, cells: int, num_classes: int) -> dict[str, int]:
    """Bytes of each array the engine returns for a map of ``cells`` cells."""
    itemsize = plan.dtype(0).itemsize
    selected = num_classes if plan.classes is None else len(plan.classes)
    outputs = {}
    if plan.include_map:
        outputs["scores"] = selected * cells * itemsize
    if plan.top_k:
        outputs["top_k_scores"] = plan.top_k * cells * itemsize
        outputs["top_k_indices"] = plan.top_k * cells * 4
    if plan.argmax:
        outputs["argmax"] = cells * 4
    for head in plan.heads:
        outputs[head_key(head.name)] = head.channels * cells * itemsize
    return outputs


def pass_copies(plan: OutputPlan, cells: int, num_classes: int) -> int:
    """Bytes a pass of ``cells`` cells needs besides the net's activations: the postprocess
    temporaries of its raw map (and of each extra head's), and its outputs on the device
    and on the host."""
    outputs = sum(output_bytes(plan, cells, num_classes).values()) + 8 * num_classes
    head_raw = sum(head.channels for head in plan.heads) * cells * 4
    return RAW_COPIES * num_classes * cells * 4 + head_raw + OUTPUT_COPIES * outputs


def scale_cost(
    plan: OutputPlan,
    *,
    scale: float,
    size: Pair,
    original: Pair,
    cells: Pair,
    num_classes: int,
    pixel_bytes: int,
) -> ScaleCost:
    """The cost of one scale's map, without its passes (they need the net).

    ``pixel_bytes`` is the bytes of one pixel of the image (all channels): the resized
    copy is made only when the size changes.
    """
    outputs = output_bytes(plan, cells[0] * cells[1], num_classes)
    resized = 0 if tuple(size) == tuple(original) else size[0] * size[1] * pixel_bytes
    return ScaleCost(scale, tuple(size), tuple(cells), outputs, resized)


def response_bytes(
    scales: tuple[ScaleCost, ...],
    *,
    num_classes: int,
    image_top_k: int = 0,
    wanted: Mapping[int, set[str]] | None = None,
    image_scores: bool = True,
) -> int:
    """A lower bound of the response's wire size: the arrays of each map (only the
    ``wanted`` names per scale index when given), the image scores and image top-k."""
    size = (4 * num_classes if image_scores else 0) + TOP_K_ENTRY_BYTES * image_top_k
    for index, scale in enumerate(scales):
        names = scale.outputs if wanted is None else wanted.get(index, set())
        size += MAP_HEADER_BYTES + sum(scale.outputs.get(name, 0) for name in names)
    return size


def describe(nbytes: int) -> str:
    """Bytes for a message: '653.1 MiB', or '38467 bytes' below 1 MiB."""
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes} bytes"
