"""KServe v2 detection outputs (docs/server.md "Detections over KServe").

With the request parameter ``detections=true`` (or when a detection output is requested by
name) the response carries, best first, N detections as three outputs:

- ``detections``: FP32 [N, 6], one row per box: x0, y0, x1, y1 (request-image pixels),
  score, class index;
- ``detection_labels``: BYTES [N], the class names (tritonclient: ``as_numpy`` gives bytes);
- ``detection_cells``: INT32 [N, 3]: scale index (in the ``scales`` order), row i, column j
  of the cell that gave each box.

N may be 0 (shapes [0, 6], [0], [0, 3]).
"""

from __future__ import annotations

import struct

import numpy as np

from densemap.service.engine.result import Detection

OUTPUTS = ("detections", "detection_labels", "detection_cells")


def detection_arrays(detections: list[Detection]) -> dict[str, np.ndarray]:
    rows = np.array(
        [[*d.box, d.score, d.class_index] for d in detections], dtype=np.float32
    ).reshape(-1, 6)
    cells = np.array([[d.scale_index, *d.cell] for d in detections], dtype=np.int32).reshape(-1, 3)
    labels = np.array([d.label.encode() for d in detections], dtype=object)
    return {"detections": rows, "detection_labels": labels, "detection_cells": cells}


def add_bytes_output(response, name: str, items: np.ndarray):
    """A BYTES output in raw_output_contents: per element a 4-byte little-endian length,
    then the bytes (the KServe v2 / Triton binary layout)."""
    data = b"".join(struct.pack("<I", len(item)) + item for item in items)
    output = response.outputs.add(name=name, datatype="BYTES", shape=[len(items)])
    response.raw_output_contents.append(data)
    return output
