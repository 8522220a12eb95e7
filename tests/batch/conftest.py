"""Fixtures of the ``densemap score`` tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.score_fixtures import build_repository


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """``tiny``: the labelled RGB model of tests/support/score_fixtures.py (with an à-trous
    variant at stride 2). Overrides the server tests' ``repo`` of tests/conftest.py; the
    files whose models differ (heads, detections, outputs) define their own."""
    return build_repository(tmp_path_factory.mktemp("repo"))
