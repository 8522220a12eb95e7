"""``densemap convert`` with several heads: --head, --head-labels, --primary-head end to end,
and bad flags as exit-2 usage errors that name the heads the model has."""

from __future__ import annotations

import os
import subprocess
import sys

import onnx
import pytest

from densemap.convert.export import export_classifier_onnx
from densemap.service.cli import main
from densemap.service.contract import Head, ModelMetadata
from tests.support.convert_heads_support import WINDOW, TwoHeads


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    """An ONNX classifier with outputs 'scores' (3 logits) and 'boxes' (4 values)."""
    path = tmp_path_factory.mktemp("detector") / "detector.onnx"
    proto = export_classifier_onnx(
        TwoHeads(form="tuple").eval(), input_size=WINDOW, in_channels=3, dynamo=False,
        output_names=("scores", "boxes"),
    )  # fmt: skip
    onnx.save_model(proto, str(path))
    return path


def _metadata(path) -> ModelMetadata:
    model = onnx.load(str(path))
    return ModelMetadata.from_props({p.key: p.value for p in model.metadata_props})


@pytest.mark.slow
def test_head_flags_end_to_end_with_verify(detector, tmp_path):
    (tmp_path / "boxes.txt").write_text("dy\ndx\ndh\ndw\n")
    (tmp_path / "classes.txt").write_text("face\nhand\nnone\n")
    out = tmp_path / "models" / "detector" / "model.onnx"
    done = subprocess.run(
        [sys.executable, "-m", "densemap.service.cli", "convert", str(detector), "-o", str(out), "--preprocessing", "unit",
         "--head", "boxes=regression", "--head-labels", f"boxes={tmp_path / 'boxes.txt'}",
         "--labels", str(tmp_path / "classes.txt"), "--strides", "2,1", "--verify"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"wrote {out}: window 12x12, stride 2x2")
    assert lines[0].endswith(", unpadded, logits")
    assert lines[1] == "heads: scores (logits, 3 labels), boxes (regression, 4 labels)"
    assert lines[2] == f"wrote {out.parent / 'model.s1.onnx'} (stride 1x1)"
    rows = [line.split() for line in lines if line.strip().endswith(" ok")]
    # per head: the main model's whole window + two sizes x (head on trunk windows, crops),
    # then its stride-1 variant's whole window + two sizes (crops)
    assert [row[2] for row in rows] == ["scores", "boxes"] * 8
    assert "  model.s1.onnx (a-trous variant):" in lines
    assert "  PASSED" in lines
    meta = _metadata(out)
    assert meta.heads == (
        Head("scores", "logits", ("face", "hand", "none")),
        Head("boxes", "regression", ("dy", "dx", "dh", "dw")),
    )
    assert _metadata(out.parent / "model.s1.onnx").heads == meta.heads


def test_primary_head_flag_picks_the_head(detector, tmp_path, capsys):
    out = tmp_path / "d.onnx"
    code = main(["convert", str(detector), "-o", str(out), "--preprocessing", "unit", "--primary-head", "boxes",
                 "--head", "scores=regression", "--head", "boxes=sigmoid"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert capsys.readouterr().out.splitlines()[1] == "heads: boxes (sigmoid), scores (regression)"
    meta = _metadata(out)
    assert (meta.output_name, meta.output_kind) == ("boxes", "sigmoid")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--head", "boxes"], "argument --head: expected NAME=KIND (e.g. boxes=...), got 'boxes'"),
        (
            ["--head", "boxes=box"],
            "argument --head: kind of head 'boxes' must be one of logits, "
            "probabilities, sigmoid, regression, got 'box'",
        ),
        (["--head-labels", "boxes"], "argument --head-labels: expected NAME=FILE"),
    ],
    ids=["no-kind", "unknown-kind", "labels-without-file"],
)
def test_malformed_head_flags_are_usage_errors(detector, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "convert",
                str(detector),
                "-o",
                str(tmp_path / "d.onnx"),
                "--preprocessing",
                "unit",
                *flags,
            ]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ") and message in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--head", "box=regression"],
         "the model has no head 'box' (given a kind (regression)); its heads are: scores, boxes"),
        (["--primary-head", "logits"],
         "the model has no head 'logits' (given the primary head); its heads are: scores, boxes"),
        (["--head-labels", "bbox=LABELS"],
         "the model has no head 'bbox' (given labels); its heads are: scores, boxes"),
        (["--head", "scores=regression", "--head", "boxes=regression"],
         "no head classifies (scores (regression), boxes (regression))"),
        (["--head", "boxes=regression", "--primary-head", "boxes"],
         "the primary head must classify, but 'boxes' is regression"),
        (["--head", "boxes=regression", "--head", "boxes=logits"],
         "head 'boxes' is given a kind twice"),
        (["--head-labels", "boxes=LABELS"],
         "3 labels were given for head 'boxes', which has 4 channels"),
        (["--head-labels", "boxes=MISSING"], "cannot read --head-labels boxes="),
    ],
    ids=["unknown-kind-head", "unknown-primary", "unknown-labels-head", "no-classifier",
         "regression-primary", "twice", "label-count", "unreadable-labels"],
)  # fmt: skip
def test_bad_head_flags_exit_2_naming_the_heads(detector, tmp_path, capsys, flags, message):
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\n")
    flags = [f.replace("LABELS", str(labels)).replace("MISSING", str(tmp_path / "no.txt"))
             for f in flags]  # fmt: skip
    out = tmp_path / "out" / "d.onnx"
    code = main(["convert", str(detector), "-o", str(out), "--preprocessing", "unit", *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("densemap convert: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert not out.parent.exists()  # nothing written, not even the folder
