"""``densemap convert`` end to end: subprocesses for the real command, in-process for errors."""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import subprocess
import sys

import onnx
import pytest
import torch
from torch import nn

from densemap.convert import archs
from densemap.service.cli import main
from densemap.service.contract import ModelMetadata
from densemap.service.engine import Engine, EngineConfig
from tests.support.convert_onnx_support import export_classifier

verify_limits = importlib.import_module("densemap.convert.verify_limits")


def _densemap(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "densemap.service.cli", "convert", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )


def _metadata(path) -> ModelMetadata:
    model = onnx.load(str(path))
    return ModelMetadata.from_props({p.key: p.value for p in model.metadata_props})


@pytest.fixture(scope="module")
def lenet_weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "lenet5.pth"
    torch.save(archs.build("lenet5").state_dict(), path)
    return path


@pytest.fixture(scope="module")
def onnx_classifier(tmp_path_factory):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)
    )
    path = tmp_path_factory.mktemp("classifier") / "cls.onnx"
    onnx.save_model(export_classifier(model, 10, dynamo=True), str(path))
    return path


@pytest.mark.slow
def test_arch_with_weights_and_verify(lenet_weights, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"digit {i}" for i in range(10)) + "\n")
    (tmp_path / "out").mkdir()
    done = _densemap(
        "--arch", "lenet5", "--weights", lenet_weights, "-o", "out/lenet5.onnx",
        "--labels", labels, "--strides", "4,2", "--verify", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "PASSED" in done.stdout and "crops (12 windows)" in done.stdout
    # the faster precision's distance from fp32, as the engine serves it
    fp16 = re.search(r"fp16\s+(\S+)\s+(\S+)\s+([\d.]+)% of (\d+) cells", done.stdout)
    assert fp16, done.stdout
    assert 0 < float(fp16[1]) < 1e-2 and float(fp16[3]) > 90 and int(fp16[4]) == 12
    assert sorted(os.listdir(tmp_path / "out")) == ["lenet5.onnx", "lenet5.s2.onnx"]
    meta = _metadata(tmp_path / "out" / "lenet5.onnx")
    assert meta.labels[3] == "digit 3" and meta.geometry.stride == (4, 4)
    assert meta.preprocessing.color == "L" and meta.source == "lenet5:lenet5.pth"
    assert meta.random_weights is False and "warning" not in done.stderr
    # every net is checked, the variant at its own stride, and the limit says where it's from
    assert "lenet5.s2.onnx (a-trous variant):" in done.stdout
    assert "crops (48 windows)" in done.stdout  # 8x6 cells at stride 2 on 46x43
    assert "the classifier's own float32 rounding" in " ".join(done.stdout.split())


@pytest.mark.slow
def test_arch_without_weights_needs_random_weights_and_the_metadata_records_it(
    tmp_path, capsys, caplog
):
    code, captured = _run_in_process(["--arch", "lenet5", "-o", tmp_path / "x.onnx"], capsys)
    assert code == 2 and not (tmp_path / "x.onnx").exists()
    assert captured.err == (
        "densemap convert: error: --arch lenet5 needs its trained weights: --weights FILE.pth "
        "(a state_dict). To convert untrained random weights on purpose (a trial, a "
        "benchmark), pass --random-weights: the metadata records it\n"
    )
    code, captured = _run_in_process(
        ["--arch", "lenet5", "--random-weights", "-o", tmp_path / "x.onnx"], capsys
    )
    assert code == 0, captured.err
    assert captured.err == (
        f"densemap convert: warning: {tmp_path / 'x.onnx'} has random, untrained weights "
        "(--random-weights): its scores mean nothing; its metadata says random_weights\n"
    )
    meta = _metadata(tmp_path / "x.onnx")
    assert meta.random_weights is True and meta.source == "lenet5:random-weights"
    with caplog.at_level(logging.WARNING, logger="densemap.engine"):
        Engine(tmp_path / "x.onnx", config=EngineConfig(warmup=False))
    assert "model 'x' was converted with random, untrained weights" in caplog.text


@pytest.mark.slow
def test_onnx_classifier(onnx_classifier, tmp_path):
    done = _densemap(
        onnx_classifier, "-o", "dense.onnx", "--preprocessing", "unit", "--verify", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert "PASSED" in done.stdout
    assert _metadata(tmp_path / "dense.onnx").geometry.window == (10, 10)
    assert "torch" not in done.stderr


def test_truncated_onnx_file(onnx_classifier, tmp_path):
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(onnx_classifier.read_bytes()[:300])
    done = _densemap(truncated, "-o", "dense.onnx", "--preprocessing", "unit", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("densemap convert: error:")
    assert "truncated" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "dense.onnx").exists()


@pytest.mark.slow
def test_pth_with_wrong_keys(lenet_weights, tmp_path):
    state = torch.load(lenet_weights)
    state["extra.weight"] = state.pop(next(iter(state)))
    wrong = tmp_path / "wrong.pth"
    torch.save(state, wrong)
    done = _densemap("--arch", "lenet5", "--weights", wrong, "-o", "x.onnx", cwd=tmp_path)
    assert done.returncode == 2
    assert "extra.weight" in done.stderr and "Traceback" not in done.stderr
    assert os.listdir(tmp_path) == ["wrong.pth"]


@pytest.mark.parametrize(
    ("flags", "hint", "wrong"),
    [
        (
            ["--input-size", "40"],
            "trained at another window size; pass it with --input-size",
            "--num-classes",
        ),
        (["--num-classes", "7"], "pass the file's class count with --num-classes", "--input-size"),
    ],
)
def test_shape_mismatch_names_the_flag_that_fixes_it(
    lenet_weights, tmp_path, capsys, flags, hint, wrong
):
    code, captured = _run_in_process(
        ["--arch", "lenet5", "--weights", lenet_weights, *flags, "-o", tmp_path / "x.onnx"], capsys
    )
    assert code == 2 and hint in captured.err and wrong not in captured.err, captured.err


def _run_in_process(argv, capsys):
    code = main(["convert", *map(str, argv)])
    return code, capsys.readouterr()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "nothing to convert: give an ONNX classifier file .* or a torch architecture"),
        (["CLS", "--arch", "lenet5"], "or --arch lenet5, not both"),
        (["CLS", "--weights", "w.pth"], "--weights only apply with --arch"),
        (["--arch", "lenet5", "--flatten-order", "hwc"], "only applies to ONNX classifiers"),
        (["--arch", "nonet", "--random-weights"], "unknown architecture 'nonet'"),
        (
            ["--arch", "lenet5", "--random-weights", "--input-size", "ax3"],
            "--input-size must be N or HxW",
        ),
        (["--arch", "lenet5"], "--arch lenet5 needs its trained weights: --weights FILE.pth"),
        (["--arch", "lenet5", "--weights", "w.pth", "--random-weights"], "not both"),
        (["CLS", "--random-weights"], "--random-weights only apply with --arch"),
        (["CLS", "--strides", "16,x"], "--strides must be N or HxW"),
        (["CLS", "--labels", "missing.txt"], "cannot read --labels"),
        (["CLS", "--preprocessing", "PREP"], "--preprocessing .*fields: layout"),
        (["CLS", "--preprocessing", "imagenett"], "cannot read --preprocessing imagenett.*preset"),
        (["ONLY_CLS"], "no input normalisation .*--preprocessing imagenet .*--preprocessing unit"),
        (["CLS", "--strides", "3"], "does not divide"),
        (["--arch", "lenet5", "--weights", "nope.pth"], "nope.pth"),
        (["CLS", "-o", "CLS"], "must differ from the classifier"),
    ],
)
def test_bad_inputs_exit_2_with_one_line(argv, message, onnx_classifier, tmp_path, capsys):
    (tmp_path / "prep.json").write_text(json.dumps({"colour": "RGB"}))
    argv = [
        {"CLS": onnx_classifier, "PREP": tmp_path / "prep.json"}.get(a, a)
        if not a.endswith((".txt", ".pth"))
        else tmp_path / a
        for a in argv
    ]
    if onnx_classifier in argv and "--preprocessing" not in argv:
        argv += ["--preprocessing", "unit"]
    argv = [onnx_classifier if a == "ONLY_CLS" else a for a in argv]
    output = [] if "-o" in argv else ["-o", tmp_path / "out.onnx"]
    code, captured = _run_in_process([*argv, *output], capsys)
    assert code == 2
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("densemap convert: error:")
    assert __import__("re").search(message, captured.err), captured.err
    assert not (tmp_path / "out.onnx").exists()


def test_failed_verify_exits_1_and_removes_the_output(onnx_classifier, tmp_path, capsys, monkeypatch):  # fmt: skip
    monkeypatch.setattr(verify_limits.Tolerance, "limit", lambda self, scores: -1.0)
    code, captured = _run_in_process(
        [
            onnx_classifier,
            "-o",
            tmp_path / "d.onnx",
            "--strides",
            "2",
            "--verify",
            "--preprocessing",
            "unit",
        ],
        capsys,
    )
    assert code == 1
    assert "FAILED" in captured.out and "verification failed" in captured.out
    assert os.listdir(tmp_path) == []


def test_missing_torch_gives_the_install_hint(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    argv = ["--arch", "lenet5", "--random-weights", "-o", tmp_path / "x.onnx"]
    code, captured = _run_in_process(argv, capsys)
    assert code == 2
    assert "pip install 'densemap[convert]'" in captured.err


def test_preprocessing_file_goes_into_the_contract(onnx_classifier, tmp_path, capsys):
    prep = {"layout": "NCHW", "color": "BGR", "scale": 1.0, "mean": [1, 2, 3], "std": [2, 2, 2]}
    (tmp_path / "prep.json").write_text(json.dumps(prep))
    code, captured = _run_in_process(
        [onnx_classifier, "-o", tmp_path / "d.onnx", "--preprocessing", tmp_path / "prep.json"],
        capsys,
    )
    assert code == 0, captured.err
    meta = _metadata(tmp_path / "d.onnx")
    assert meta.preprocessing.color == "BGR" and meta.preprocessing.mean == (1.0, 2.0, 3.0)


def test_the_convert_flags_live_in_one_module_that_imports_no_command():
    """densemap.convert.flags owns every flag (heads too) and needs nothing of densemap.convert.cli: no cycle."""
    code = (
        "import argparse, sys, densemap.convert.flags as f; p = argparse.ArgumentParser(); "
        "f.add_arguments(p); print('densemap.convert.cli' in sys.modules); "
        "print(sorted(a.dest for a in p._actions if a.dest in ('head_kinds', 'head_labels', "
        "'primary_head', 'strides')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "False",
        "['head_kinds', 'head_labels', 'primary_head', 'strides']",
    ]


def test_detection_settings_go_into_the_model_folders_densemap_json(
    onnx_classifier, tmp_path, capsys
):
    """--nms-iou/--across-classes/... merge into densemap.json beside -o (other settings
    kept); the repository then loads them; a bad value converts nothing."""
    from densemap.service.engine.repository import load_model

    folder = tmp_path / "repo" / "cls"
    folder.mkdir(parents=True)
    (folder / "densemap.json").write_text(json.dumps({"box_offsets": [0.1, 0.1, -0.1, -0.1]}))
    base = ["convert", str(onnx_classifier), "-o", str(folder / "model.onnx"), "--preprocessing", "unit"]  # fmt: skip
    assert main([*base, "--nms-iou", "0.3", "--across-classes"]) == 0
    assert f"wrote {folder / 'densemap.json'}" in capsys.readouterr().out
    settings = json.loads((folder / "densemap.json").read_text())
    assert settings == {
        "box_offsets": [0.1, 0.1, -0.1, -0.1],
        "detections": {"iou": 0.3, "across_classes": True},
    }
    assert main([*base, "--threshold", "0.6", "--no-across-classes"]) == 0
    config = load_model(tmp_path / "repo", "cls").config
    assert (config.detections.iou, config.detections.threshold) == (0.3, 0.6)
    assert config.detections.across_classes is False and config.box_offsets[0] == 0.1
    (folder / "model.onnx").unlink()
    assert main([*base, "--nms-iou", "1.5"]) == 2
    assert "--nms-iou: detections.iou must be in [0, 1], got 1.5" in capsys.readouterr().err
    assert not (folder / "model.onnx").exists()
