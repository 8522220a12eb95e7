"""densemap.v1 detection messages <-> engine types (DetectionOptions, Detection)."""

from __future__ import annotations

from service._proto.densemap.v1 import densemap_pb2 as pb
from service.engine.options import (
    DEFAULT_DETECTION_THRESHOLD,
    DEFAULT_MAX_DETECTIONS,
    DEFAULT_NMS_IOU,
    DetectionOptions,
)
from service.engine.result import Detection


def detection_options_to_proto(options: DetectionOptions, out: pb.DetectionOptions) -> None:
    """Client side (the options checked their values; the server checks them against the
    model)."""
    out.SetInParent()
    if options.classes is not None:
        out.classes[:] = options.classes
    out.threshold = options.threshold
    out.iou = options.iou
    out.max_count = options.max_count
    out.across_classes = options.across_classes
    if options.box_offsets is not None:
        out.box_offsets[:] = options.box_offsets


def detection_options_from_proto(options: pb.DetectionOptions) -> DetectionOptions:
    """Server side: unset fields take the defaults; DetectionOptions checks the values."""
    return DetectionOptions(
        classes=tuple(options.classes) or None,
        threshold=(
            options.threshold if options.HasField("threshold") else DEFAULT_DETECTION_THRESHOLD
        ),
        iou=options.iou if options.HasField("iou") else DEFAULT_NMS_IOU,
        max_count=options.max_count if options.HasField("max_count") else DEFAULT_MAX_DETECTIONS,
        across_classes=options.across_classes,
        box_offsets=tuple(options.box_offsets) or None,
    )


def fill_detections(out: pb.ScoreResponse, detections: list[Detection] | None) -> None:
    for detection in detections or ():
        item = out.detections.add(
            class_index=detection.class_index,
            label=detection.label,
            score=detection.score,
            scale=detection.scale,
            scale_index=detection.scale_index,
        )
        item.box.x0, item.box.y0, item.box.x1, item.box.y1 = detection.box
        item.cell.h, item.cell.w = detection.cell


def detections_from_response(response: pb.ScoreResponse) -> list[Detection]:
    return [
        Detection(
            class_index=d.class_index,
            label=d.label,
            score=d.score,
            box=(d.box.x0, d.box.y0, d.box.x1, d.box.y1),
            scale=d.scale,
            scale_index=d.scale_index,
            cell=(d.cell.h, d.cell.w),
        )
        for d in response.detections
    ]
