"""Batch scoring of image files and folders (``densemap score``).

- :mod:`.walk` finds the images (recursive, ``--glob`` filters, non-images skipped);
- :mod:`.outputs` writes one ``.npz`` per image atomically and reads it back;
- :mod:`.rundir` owns the output folder: lock, leftover temp files, resume, run settings;
- :mod:`.summary` writes ``summary.jsonl``;
- :mod:`.heatmap` renders PNG overlays;
- :mod:`.pipeline` overlaps decoding and writing with inference in threads;
- :mod:`.progress` shows a bar (terminal) or log lines (pipes, CI);
- :mod:`.ray_pipeline` runs the same per-image work on Ray Data actors.

Nothing here imports ray at module level; only :mod:`.ray_pipeline` does, inside functions.
"""
