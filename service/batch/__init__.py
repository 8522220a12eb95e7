"""Batch scoring of image files and folders (``densemap score``).

- :mod:`.run` runs one batch end to end (used by ``service/score_cli.py``);
- :mod:`.walk` finds the images (recursive, ``--glob`` filters, non-images skipped);
- :mod:`.scorers` reaches the model: in-process engine or ``--server``;
- :mod:`.outputs` writes one ``.npz`` per image atomically and reads it back;
- :mod:`.rundir` owns the output folder: lock, leftover temp files, resume, run settings;
- :mod:`.writer` writes one image's files and returns its summary row;
- :mod:`.summary` writes ``summary.jsonl``;
- :mod:`.heatmap` renders PNG overlays;
- :mod:`.pipeline` overlaps decoding and writing with inference in threads;
- :mod:`.progress` shows a bar (terminal) or log lines (pipes, CI);
- :mod:`.ray_pipeline` runs the same per-image work on Ray Data actors.

Nothing here imports ray at module level; only :mod:`.ray_pipeline` does, inside functions.
"""
