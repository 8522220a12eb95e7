"""The README's first command, as a smoke run: real server, real client, bundled model."""

import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.support.paths import REPO_ROOT

PAGES = sorted((REPO_ROOT / "models" / "digits" / "pages").glob("*.png"))


@pytest.mark.slow
def test_demo_serves_scores_and_draws_every_page(tmp_path):
    stale = tmp_path / "stride4" / f"{PAGES[0].name}.heatmap.png"  # from an older run
    stale.parent.mkdir()
    stale.write_bytes(b"old picture")
    stale.with_name(f"{PAGES[0].name}.npz").write_bytes(b"old map")
    result = subprocess.run(
        [sys.executable, "-m", "models.digits.demo", "--out", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "server stopped cleanly" in result.stdout
    assert PAGES, "the sample pages are missing"
    rows = re.findall(r"^(page_\d+\.png)\s+(\d+)\s+(\d+)x(\d+)\s+(\d+)/(\d+)", result.stdout, re.M)
    assert len(rows) == 2 * len(PAGES), result.stdout
    for name, stride, n_h, n_w, found, drawn in rows:
        height, width = Image.open(REPO_ROOT / "models" / "digits" / "pages" / name).size[::-1]
        stride = int(stride)
        # cells per axis: (W - R) // S + 1 with R = 28
        assert (int(n_h), int(n_w)) == ((height - 28) // stride + 1, (width - 28) // stride + 1)
        assert int(found) >= 0.9 * int(drawn), f"{name} at stride {stride}: {found}/{drawn}"
        heatmap = tmp_path / f"stride{stride}" / f"{name}.heatmap.png"
        with Image.open(heatmap) as picture:
            # the image's size plus the legend band below it (one or two rows of 14 px)
            assert picture.width == width and height + 14 < picture.height <= height + 2 * 14 + 4
        boxes = (tmp_path / f"stride{stride}" / "detections.jsonl").read_text()
        assert f'"relpath": "{name}"' in boxes  # the table reads the product's detections
        with np.load(tmp_path / f"stride{stride}" / f"{name}.npz") as npz:
            assert any(a.shape[-2:] == (int(n_h), int(n_w)) for a in npz.values() if a.ndim >= 2)
