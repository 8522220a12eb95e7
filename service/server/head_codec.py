"""densemap.v1 messages of models with several heads <-> engine types.

The request's ``heads``/``omit_heads`` <-> ``ScoreOptions.heads``; each ScaleMap's extra
head maps <-> ``HeadMap`` messages (name, kind, labels, values); the model's heads <->
``ModelInfo.heads``. Arrays travel as every other map does (:mod:`densemap.service.server.codec`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from densemap.service._proto.densemap.v1 import densemap_pb2 as pb
from densemap.service.engine.heads import HeadInfo
from densemap.service.engine.result import ScaleMap
from densemap.service.errors import InvalidOption


def heads_to_proto(heads: tuple[str, ...] | None, out: pb.ScoreOptions) -> None:
    """Client side: None = every extra head (empty list), () = none (``omit_heads``)."""
    if heads is None:
        return
    if isinstance(heads, str):
        raise InvalidOption(f"heads must be a sequence of head names, got {heads!r}")
    names = list(heads)
    if names:
        out.heads[:] = names
    else:
        out.omit_heads = True


def heads_from_proto(options: pb.ScoreOptions) -> tuple[str, ...] | None:
    """Server side: the engine's ``heads`` option (it checks the names against the model)."""
    if options.omit_heads:
        if options.heads:
            raise InvalidOption(
                f"omit_heads is set but heads names {list(options.heads)[:5]}: send one of them"
            )
        return ()
    return tuple(options.heads) or None


def fill_head_maps(
    out: pb.ScaleMap,
    scale_map: ScaleMap,
    heads: tuple[HeadInfo, ...],
    fill_tensor: Callable[[pb.Tensor, np.ndarray], None],
) -> None:
    """Server side: one HeadMap per extra head returned, in model order."""
    for head in heads:
        values = scale_map.head_maps.get(head.name)
        if values is None:
            continue
        head_pb = out.heads.add(name=head.name, kind=head.kind)
        head_pb.labels[:] = head.labels
        fill_tensor(head_pb.values, values)


def read_head_maps(
    map_pb: pb.ScaleMap, read_tensor: Callable[..., np.ndarray]
) -> tuple[dict[str, np.ndarray], tuple[HeadInfo, ...]]:
    """Client side: (name -> values [channels, n_h, n_w], the heads described)."""
    maps, infos = {}, []
    for head_pb in map_pb.heads:
        values = read_tensor(head_pb.values, what=f"heads[{head_pb.name!r}].values")
        maps[head_pb.name] = values
        channels = int(values.shape[0]) if values.ndim else 0
        infos.append(HeadInfo(head_pb.name, head_pb.kind, tuple(head_pb.labels), channels))
    return maps, tuple(infos)


def fill_model_heads(out: pb.ModelInfo, heads: tuple[HeadInfo, ...], *, with_labels: bool) -> None:
    """``ModelInfo.heads``: every head, primary first (labels only in GetModel)."""
    for head in heads:
        head_pb = out.heads.add(name=head.name, kind=head.kind, channels=head.channels)
        if with_labels:
            head_pb.labels[:] = head.labels


def model_heads_from_proto(info: pb.ModelInfo) -> tuple[HeadInfo, ...]:
    """Client side: the heads a server reports; a server from before heads reports none,
    then the one primary head is described by the model's classes."""
    if not info.heads:
        return (HeadInfo("scores", info.output_kind, tuple(info.labels), info.num_classes),)
    return tuple(
        HeadInfo(head.name, head.kind, tuple(head.labels), head.channels) for head in info.heads
    )
