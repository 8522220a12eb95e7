"""Fixtures shared by more than one layer of tests (pytest finds them here, no import needed).

The suite is one folder per layer, each with a conftest.py for the fixtures its own files
share (a fixture lives in the conftest of the lowest folder all its users sit in):

- contract/  the metadata contract, option text and checks, public names, the torch-free
             service and its runtime extra, docs and --help
- convert/   classifier -> dense ONNX: exactness on both paths, refusals, verify, the CLI
- engine/    the engine: maps, strides, tiles, heads, inputs, precisions, memory
- server/    ``densemap serve``: densemap.v1 and KServe, errors, hostile clients, lifecycle
- batch/     ``densemap score``: files, resume, ``--server``, Ray Data
- digits/    the bundled digits model and its recipe
- e2e/       whole journeys: demo, wheel and image installs, deploy files, convert -> serve
- support/   importable helpers (``from tests.support.dense_models import ...``); the
             crop-by-crop reference every dense map is checked against is support/oracle.py
- bench/, sweep/  not collected by ``make test`` (``make bench``, ``make soak``, ``make sweep``)

Tests slower than ~3 s on 2 cores are marked ``slow``: ``make test-fast`` skips them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.server_harness import build_repository


@pytest.fixture(scope="session")
def repo(tmp_path_factory) -> Path:
    """A repository with the TINY and GREY models (built once per session).

    tests/batch/conftest.py overrides it with the labelled model the score tests use.
    """
    return build_repository(tmp_path_factory.mktemp("repo"))
