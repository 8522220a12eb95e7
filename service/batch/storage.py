"""What ``densemap score`` keeps on disk per image: ``--save``, ``--map-dtype``, compression.

``--save`` modes and the ``.npz`` arrays each keeps (per scale ``k``):

- ``maps`` (default): ``scores_<k>`` (plus ``top_k_*`` with ``--top-k``);
- ``top-k``: ``top_k_indices_<k>`` and ``top_k_scores_<k>`` only (needs ``--top-k K``);
- ``argmax``: ``argmax_<k>`` (int32 class index per cell) and ``argmax_scores_<k>`` (its
  score);
- ``detections``: no ``.npz``; the boxes go to ``detections.jsonl`` (needs ``--detections``);
- ``none``: no ``.npz`` (summary, and heat-maps when asked, only).

In every mode that writes an ``.npz``, each extra head's map is ``head_<name>_<k>`` (models
with several heads; ``--heads`` picks them), stored in the map dtype like the scores.

Scores are stored as float16 (``--map-dtype fp16``, the default: each value is the
engine's rounded to the nearest float16) or as float32 (``--map-dtype fp32``: as the engine
computed them; refused with ``--dtype fp16``, whose maps hold float16 values only), in a
deflate-compressed zip (as ``numpy.savez_compressed``) unless ``--no-compress``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from densemap.service.engine.result import ScaleMap
from densemap.service.errors import InvalidOption

SAVE_MODES = ("maps", "top-k", "argmax", "detections", "none")
MAP_DTYPES = {"fp16": np.float16, "fp32": np.float32}
# What files written before --save existed hold: float32 maps in a plain (stored) zip.
LEGACY = {"save": "maps", "map_dtype": "fp32", "compress": False}


@dataclass(frozen=True)
class Storage:
    save: str = "maps"
    map_dtype: str = "fp16"
    compress: bool = True

    def __post_init__(self) -> None:
        if self.save not in SAVE_MODES:
            raise InvalidOption(f"--save {self.save!r}: use one of {', '.join(SAVE_MODES)}")
        if self.map_dtype not in MAP_DTYPES:
            raise InvalidOption(f"--map-dtype {self.map_dtype!r}: use fp16 or fp32")

    @property
    def writes_npz(self) -> bool:
        return self.save not in ("detections", "none")

    def to_json(self) -> dict:
        return {"save": self.save, "map_dtype": self.map_dtype, "compress": self.compress}


def check_storage(storage: Storage, *, top_k: int, detections: bool, dtype: str) -> None:
    """Refuse a ``--save`` that the other options leave with nothing to keep, and a
    ``--map-dtype`` that contradicts the maps' ``dtype`` (ScoreOptions.dtype)."""
    if dtype == "float16" and storage.map_dtype == "fp32":
        raise InvalidOption(
            "--dtype fp16 and --map-dtype fp32 contradict each other: the maps would hold "
            "float16 values stored as float32. Drop --dtype fp16 to store the engine's float32 "
            "values, or --map-dtype fp32 to store float16"
        )
    if storage.save == "top-k" and top_k <= 0:
        raise InvalidOption("--save top-k keeps the per-cell top-k classes: add --top-k K")
    if storage.save == "detections" and not detections:
        raise InvalidOption("--save detections keeps the boxes only: add --detections")


def _scores(values: np.ndarray, storage: Storage) -> np.ndarray:
    """The values in the stored dtype: float16 for ``fp16``, float32 for ``fp32``."""
    return np.ascontiguousarray(values, dtype=MAP_DTYPES[storage.map_dtype])


def head_arrays(k: int, scale_map: ScaleMap, storage: Storage) -> dict[str, np.ndarray]:
    """The extra heads' maps of map ``k``, in the stored map dtype (none without an .npz)."""
    if not storage.writes_npz:
        return {}
    return {
        f"head_{name}_{k}": _scores(values, storage) for name, values in scale_map.head_maps.items()
    }


def map_arrays(k: int, scale_map: ScaleMap, storage: Storage) -> dict[str, np.ndarray]:
    """The arrays of map ``k`` that ``storage.save`` keeps, in their stored dtypes."""
    arrays: dict[str, np.ndarray] = {}
    save = storage.save
    if save == "maps" and scale_map.scores is not None:
        arrays[f"scores_{k}"] = _scores(scale_map.scores, storage)
    if save in ("maps", "top-k") and scale_map.top_k_indices is not None:
        arrays[f"top_k_indices_{k}"] = np.ascontiguousarray(scale_map.top_k_indices)
        arrays[f"top_k_scores_{k}"] = _scores(scale_map.top_k_scores, storage)
    if save == "maps" and scale_map.argmax is not None:
        arrays[f"argmax_{k}"] = np.ascontiguousarray(scale_map.argmax)
    if save == "argmax":
        if scale_map.scores is not None:
            channel = scale_map.scores.argmax(axis=0)
            classes = np.asarray(scale_map.classes or range(scale_map.scores.shape[0]))
            arrays[f"argmax_{k}"] = classes[channel].astype(np.int32)
            best = np.take_along_axis(scale_map.scores, channel[None], axis=0)[0]
            arrays[f"argmax_scores_{k}"] = _scores(best, storage)
        elif scale_map.argmax is not None:
            arrays[f"argmax_{k}"] = np.ascontiguousarray(scale_map.argmax)
    return arrays
