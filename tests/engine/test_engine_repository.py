"""Model repository (reload rules), memory estimate, and the engine without torch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from densemap.service.engine import EngineConfig, ModelRepository, default_models_dir
from densemap.service.engine.memory import ActivationEstimator, nchwc_block
from densemap.service.engine.repository import bundled_models_dir, load_model
from densemap.service.errors import ModelLoadError, ModelNotFound
from tests.support.dense_models import build_dense_model
from tests.support.paths import REPO_ROOT

CONFIG = EngineConfig(warmup=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Two distinct built models to copy into repositories: (5 classes, 3 classes)."""
    root = tmp_path_factory.mktemp("built")
    return build_dense_model(root / "five"), build_dense_model(root / "three", classes=3, seed=1)


def install(root: Path, name: str, model: Path) -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    for file in model.parent.iterdir():
        shutil.copy2(file, folder / file.name)
    return folder


def bump(path: Path) -> None:
    """Make a change visible to the (size, mtime) signature even within one clock tick."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


def test_reload_adds_updates_removes_and_keeps_working_models(tmp_path, built):
    five, three = built
    install(tmp_path, "alpha", five)
    install(tmp_path, "beta", five)
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / ".hidden").mkdir()
    repo = ModelRepository(tmp_path, config=CONFIG)
    assert repo.names == ["alpha", "beta"] and repo.errors == {}
    assert repo.get("alpha").num_classes == 5 and repo.get("alpha").name == "alpha"

    old_alpha = repo.get("alpha")
    (tmp_path / "alpha" / "model.onnx").write_bytes(b"broken upload")
    shutil.rmtree(tmp_path / "beta")
    install(tmp_path, "gamma", three)
    install(tmp_path, "delta", five)
    (tmp_path / "delta" / "model.onnx").write_bytes(b"\x08\x07garbage")
    report = repo.reload()
    assert report.loaded == ["gamma"] and report.removed == ["beta"]
    assert set(report.failed) == {"alpha", "delta"}
    assert repo.get("alpha") is old_alpha  # the broken file never replaces a working model
    assert repo.names == ["alpha", "gamma"]
    assert set(repo.errors) == {"alpha", "delta"}
    with pytest.raises(ModelNotFound, match="failed to load"):
        repo.get("delta")
    with pytest.raises(ModelNotFound, match="available: alpha, gamma"):
        repo.get("beta")

    install(tmp_path, "alpha", three)
    bump(tmp_path / "alpha" / "model.onnx")
    report = repo.reload()
    assert report.updated == ["alpha"] and "gamma" in report.unchanged
    assert repo.get("alpha").num_classes == 3 and "alpha" not in repo.errors


def test_names_are_never_paths(tmp_path, built):
    install(tmp_path / "models", "alpha", built[0])
    repo = ModelRepository(tmp_path / "models", config=CONFIG)
    for name in ("../models/alpha", "alpha/", "/alpha", "", ".", "models"):
        with pytest.raises(ModelNotFound):
            repo.get(name)


def test_labels_file_overrides_metadata(tmp_path, built):
    folder = install(tmp_path, "alpha", built[1])
    (folder / "labels.txt").write_text("cat\ndog\nbird\n\n")
    repo = ModelRepository(tmp_path, config=CONFIG)
    assert repo.get("alpha").labels == ("cat", "dog", "bird")
    (folder / "labels.txt").write_text("cat\ndog\n")
    bump(folder / "labels.txt")
    report = repo.reload()
    assert "labels" in report.failed["alpha"]
    assert repo.get("alpha").labels == ("cat", "dog", "bird")


def test_default_models_dir_is_the_env_else_the_bundled_one_never_the_cwd(
    tmp_path, monkeypatch, built
):
    monkeypatch.setenv("DENSEMAP_MODELS", str(tmp_path / "env"))
    assert default_models_dir() == tmp_path / "env"
    monkeypatch.delenv("DENSEMAP_MODELS")
    monkeypatch.chdir(tmp_path)
    assert default_models_dir() == bundled_models_dir() == REPO_ROOT / "models"
    install(tmp_path / "models", "alpha", built[0])  # a ./models of the user's changes nothing
    assert default_models_dir() == REPO_ROOT / "models"
    assert (default_models_dir() / "digits" / "model.onnx").is_file()


def test_load_model_reads_only_the_named_folder(tmp_path, built, caplog):
    install(tmp_path, "alpha", built[0])
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.onnx").write_bytes(b"not onnx")
    with caplog.at_level("DEBUG"):
        engine = load_model(tmp_path, "alpha", config=CONFIG)
    assert engine.name == "alpha" and engine.num_classes == 5
    assert "broken" not in caplog.text  # the broken sibling was never opened
    with pytest.raises(
        ModelNotFound, match=r"'nope' is not in the repository .*available: alpha, broken"
    ):
        load_model(tmp_path, "nope", config=CONFIG)
    with pytest.raises(ModelLoadError):
        load_model(tmp_path, "broken", config=CONFIG)
    with pytest.raises(ModelNotFound, match="cannot be read .*--models DIR"):
        load_model(tmp_path / "missing", "alpha", config=CONFIG)


def test_a_failed_model_is_logged_once_per_change(tmp_path, built, caplog):
    install(tmp_path, "alpha", built[0])
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.onnx").write_bytes(b"not onnx")
    with caplog.at_level("ERROR"):
        repo = ModelRepository(tmp_path, config=CONFIG)
        repo.reload()  # unchanged files: no retry, no second line
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        "model 'broken' failed to load"
    ]
    assert repo.names == ["alpha"] and "broken" in repo.errors


def test_activation_estimate_of_a_known_graph():
    """Input [1,1,H,W] -> Conv 3x3 (4 ch) -> Relu: peak = conv out + relu out (input freed)."""
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 1, 3, 3], np.ones(36, np.float32))
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["c"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    estimator = ActivationEstimator(model, input_name="x", layout="NCHW")
    for h, w in ((10, 20), (101, 7)):
        conv_out = 4 * (h - 2) * (w - 2) * 4
        assert estimator.activation_bytes(h, w) == max(h * w * 4 + conv_out, 2 * conv_out)
    # on CPU, onnxruntime holds what follows a Conv in the NCHWc layout: 4 channels -> 16
    blocked = ActivationEstimator(model, input_name="x", layout="NCHW", channel_block=16)
    for h, w in ((10, 20), (101, 7)):
        conv_out = 16 * (h - 2) * (w - 2) * 4  # the input (1 channel) is not padded
        assert blocked.activation_bytes(h, w) == max(h * w * 4 + conv_out, 2 * conv_out)


def test_engine_runs_with_torch_blocked(tmp_path, built):
    script = textwrap.dedent(
        f"""
        import sys
        class BlockTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
        sys.meta_path.insert(0, BlockTorch())
        import numpy as np
        from densemap.service.engine import Engine, ModelRepository, ScoreOptions
        engine = Engine({str(built[0])!r})
        image = (np.arange(40 * 50) % 251).astype(np.uint8).reshape(40, 50)
        result = engine.score(image, ScoreOptions(output_stride=2, scales=(1.0, 1.5)))
        assert result.maps[0].scores.shape == (5, 15, 18), result.maps[0].scores.shape
        assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_engine_estimate_scales_with_pixels(built):
    from densemap.service.engine import Engine

    engine = Engine(built[0], config=CONFIG)
    small, big = engine.estimate_bytes(40, 40), engine.estimate_bytes(400, 400)
    assert 90 < big / small < 110  # activations grow with the pixel count
    model = onnx.load(str(built[0]))
    assert engine.estimate_bytes(40, 40) == ActivationEstimator(
        model, input_name="input", layout="NCHW", channel_block=nchwc_block()
    ).activation_bytes(40, 40)
