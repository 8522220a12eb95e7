"""The rows of ``--verify`` (:mod:`densemap.convert.verify`): the references of every image, computed
before any dense net runs (:class:`Expected`), then each net against them (:class:`Check`).
"""

from __future__ import annotations

import numpy as np

from densemap.convert.classifier_runner import crop_scores
from densemap.convert.trunk_windows import TrunkNotDense
from densemap.convert.verify_reference import Reference
from densemap.convert.verify_report import (
    CROPS,
    HEAD_ON_TRUNK,
    NATIVE_MAP,
    TORCH_MODULE,
    WHOLE_WINDOW,
    VerifyRow,
)
from densemap.service.contract import Geometry, ModelMetadata

Pair = tuple[int, int]


def on_trunk_grid(stride: Pair, cut) -> bool:
    """Whether windows at ``stride`` start on the trunk output's grid (k integer)."""
    return cut is not None and all(s % j == 0 for s, j in zip(stride, cut.jump, strict=True))


def image_size(image: np.ndarray, meta: ModelMetadata) -> Pair:
    return tuple(image.shape[2:4] if meta.preprocessing.layout == "NCHW" else image.shape[1:3])


class Expected:
    """The references of every image, computed before any dense net runs."""

    def __init__(self, reference: Reference, meta: ModelMetadata, bar) -> None:
        self.reference = reference
        self.meta = meta
        self.bar = bar
        self.unavailable = reference.exact_unavailable

    def exact(self, image, stride: Pair, cells: Pair) -> dict[str, np.ndarray] | None:
        """The head on the trunk's windows, or None (``unavailable`` says why)."""
        if self.unavailable:
            return None
        try:
            return self.reference.trunk_windows(image, stride=stride, cells=cells)
        except TrunkNotDense as exc:
            self.unavailable = str(exc)
            return None
        finally:
            self.bar.step("head on trunk windows")

    def crops(self, image, geometry: Geometry, cells: Pair) -> dict[str, np.ndarray]:
        return crop_scores(
            self.reference.classify.run, image, geometry=geometry,
            layout=self.meta.preprocessing.layout, cells=cells, step=self.bar.step,
        )  # fmt: skip

    def main(self, image, geometry: Geometry) -> dict:
        cells = geometry.cells(*image_size(image, self.meta))
        return {
            "cells": cells,
            HEAD_ON_TRUNK: self.exact(image, geometry.stride, cells),
            CROPS: self.crops(image, geometry, cells),
        }

    def variant(self, image, net) -> dict:
        cells = net.geometry.cells(*image_size(image, self.meta))
        found = {"cells": cells}
        if not self.meta.geometry.padded:
            found[CROPS] = self.crops(image, net.geometry, cells)
            return found
        if on_trunk_grid(net.geometry.stride, self.reference.cut):
            found[HEAD_ON_TRUNK] = self.exact(image, net.geometry.stride, cells)
        return found


def add_module_maps(classify, geometry: Geometry, images, references, bar) -> None:
    """The converted torch module's maps (padded torch path: an extra row)."""
    from densemap.convert.from_torch.fc import fully_convolutional

    module = fully_convolutional(classify.torch_module, input_size=geometry.window)
    for image, found in zip(images, references, strict=True):
        cells = found["cells"]
        outputs = classify.module_outputs(module, image)
        found[TORCH_MODULE] = {
            name: out[0, :, : cells[0], : cells[1]] for name, out in outputs.items()
        }
        bar.step("converted torch module")


class Check:
    """The rows of one verification, net by net, head by head."""

    def __init__(self, names, meta: ModelMetadata, tolerances, bar) -> None:
        self.meta = meta
        self.tolerances = tolerances
        self.names = names
        self.bar = bar
        self.main_maps: list[dict[str, np.ndarray]] = []

    def rows(self, net, size, cells, against, got, expected, *, checked=True) -> list[VerifyRow]:
        """One row per head: ``got`` and ``expected`` are {head: values}."""
        rows = []
        for name in self.names:
            values, reference = got[name], expected[name]
            diff = (
                float(np.abs(values.astype(np.float64) - reference).max()) if values.size else 0.0
            )
            limit = self.tolerances[name].limit(reference) if checked else None
            head = name if len(self.names) > 1 else ""
            rows.append(VerifyRow(size, cells, against, diff, limit, net=net.label, head=head))
        return rows

    def at_window(self, net, windows, reference) -> list[VerifyRow]:
        scores = {name: out[:, :, 0, 0] for name, out in net.run(windows).items()}
        self.bar.step(f"{net.label or 'main model'} at R")
        against = f"{WHOLE_WINDOW} ({len(windows)})" if len(windows) > 1 else WHOLE_WINDOW
        return self.rows(net, net.geometry.window, (1, 1), against, scores, reference)

    def maps(self, net, image, cells) -> dict[str, np.ndarray]:
        return {name: out[0, :, : cells[0], : cells[1]] for name, out in net.run(image).items()}

    def compare(self, net, image, found, maps) -> list[VerifyRow]:
        size, cells = image_size(image, self.meta), found["cells"]
        windows = f"({cells[0] * cells[1]} windows)"
        rows = []
        if found.get(HEAD_ON_TRUNK) is not None:
            against = f"{HEAD_ON_TRUNK} {windows}"
            rows += self.rows(net, size, cells, against, maps, found[HEAD_ON_TRUNK])
        if CROPS in found:
            checked = not self.meta.geometry.padded
            against = f"{CROPS} {windows}"
            rows += self.rows(net, size, cells, against, maps, found[CROPS], checked=checked)
        if TORCH_MODULE in found:
            rows += self.rows(net, size, cells, TORCH_MODULE, maps, found[TORCH_MODULE])
        return rows

    def main(self, net, windows, at_window, images, references) -> list[VerifyRow]:
        rows = self.at_window(net, windows, at_window)
        for image, found in zip(images, references, strict=True):
            maps = self.maps(net, image, found["cells"])
            self.main_maps.append(maps)
            self.bar.step(f"main model {image_size(image, self.meta)}")
            rows += self.compare(net, image, found, maps)
        net.close()
        return rows

    def variant(self, net, windows, at_window, images, references) -> list[VerifyRow]:
        """Unpadded: the variant's maps against crops at its stride. Padded: their every k-th
        cell against the native maps, and against the head on the trunk's windows at T when
        T is a multiple of the trunk's stride."""
        rows = self.at_window(net, windows, at_window)
        native = self.meta.geometry.stride
        k = tuple(s // t for s, t in zip(native, net.geometry.stride, strict=True))
        for image, main_maps, found in zip(images, self.main_maps, references, strict=True):
            size = image_size(image, self.meta)
            maps = self.maps(net, image, found["cells"])
            self.bar.step(f"{net.label} {size[0]}x{size[1]}")
            if self.meta.geometry.padded:
                native_cells = next(iter(main_maps.values())).shape[1:]
                shared = {
                    name: m[:, :: k[0], :: k[1]][:, : native_cells[0], : native_cells[1]]
                    for name, m in maps.items()
                }
                rows += self.rows(net, size, native_cells, NATIVE_MAP, shared, main_maps)
            rows += self.compare(net, image, found, maps)
        net.close()
        return rows
