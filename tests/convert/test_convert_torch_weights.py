"""load_weights: safe state_dict loading, checkpoint wrappers, pickled modules only when
trusted, and errors naming the file and the offending keys."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from densemap.convert import archs
from densemap.convert.from_torch.weights import load_weights
from densemap.service.errors import ConversionError


def trained_lenet(num_classes=10) -> nn.Module:
    torch.manual_seed(1)
    model = archs.build("lenet5", num_classes=num_classes)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)  # differ from any fresh init
    return model


def assert_same_weights(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": sd, "epoch": 3},
        lambda sd: {"model_state_dict": sd, "optimizer": {"lr": 0.1}},
        lambda sd: {f"module.{k}": v for k, v in sd.items()},
        lambda sd: {"state_dict": {f"_orig_mod.{k}": v for k, v in sd.items()}},
    ],
    ids=["plain", "state_dict", "model_state_dict", "dataparallel", "compiled"],
)
def test_state_dict_forms_load(tmp_path, wrap):
    source = trained_lenet()
    path = tmp_path / "w.pth"
    torch.save(wrap(source.state_dict()), path)
    target = archs.build("lenet5")
    assert load_weights(target, path) is target
    assert_same_weights(source, target)


def test_missing_batchnorm_counters_are_tolerated(tmp_path):
    # torchvision's older published ResNet files have no num_batches_tracked buffers.
    source = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    state = {k: v for k, v in source.state_dict().items() if "num_batches_tracked" not in k}
    torch.save(state, tmp_path / "old.pth")
    target = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    load_weights(target, tmp_path / "old.pth")
    assert torch.equal(target[0].weight, source[0].weight)


def test_pickled_module_needs_trust(tmp_path):
    source = trained_lenet()
    path = tmp_path / "full.pth"
    torch.save(source, path)
    with pytest.raises(ConversionError, match=r"full\.pth.*arbitrary code.*--trust-pickle"):
        load_weights(archs.build("lenet5"), path)
    target = load_weights(archs.build("lenet5"), path, trust_pickle=True)
    assert_same_weights(source, target)
    whole = load_weights(None, path, trust_pickle=True)
    assert isinstance(whole, nn.Module) and whole is not source
    assert_same_weights(source, whole)


def test_state_dict_without_architecture_is_explained(tmp_path):
    torch.save(trained_lenet().state_dict(), tmp_path / "w.pth")
    with pytest.raises(ConversionError, match="--arch"):
        load_weights(None, tmp_path / "w.pth")


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty", "missing", "directory"])
def test_unreadable_files_name_the_file(tmp_path, kind):
    path = tmp_path / f"{kind}.pth"
    if kind == "truncated":
        torch.save(trained_lenet().state_dict(), path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        path.write_bytes(b"not a checkpoint " * 20)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "directory":
        path.mkdir()
    with pytest.raises(ConversionError, match=rf"{kind}\.pth"):
        load_weights(archs.build("lenet5"), path)


def test_not_a_state_dict(tmp_path):
    torch.save([torch.zeros(3)], tmp_path / "list.pth")
    with pytest.raises(ConversionError, match=r"list\.pth does not hold a state_dict"):
        load_weights(archs.build("lenet5"), tmp_path / "list.pth")


def test_class_count_mismatch_suggests_num_classes(tmp_path):
    torch.save(trained_lenet(num_classes=7).state_dict(), tmp_path / "seven.pth")
    with pytest.raises(ConversionError) as caught:
        load_weights(archs.build("lenet5"), tmp_path / "seven.pth")
    message = str(caught.value)
    assert "seven.pth" in message and "--num-classes" in message
    assert "classifier.4.weight: file [7, 84] vs model [10, 84]" in message


def test_wrong_architecture_lists_missing_and_unexpected_keys(tmp_path):
    state = {k.replace("classifier", "head"): v for k, v in trained_lenet().state_dict().items()}
    torch.save(state, tmp_path / "renamed.pth")
    target = archs.build("lenet5")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ConversionError) as caught:
        load_weights(target, tmp_path / "renamed.pth")
    message = str(caught.value)
    assert "6 missing keys (classifier.0.weight, classifier.0.bias, classifier.2.weight" in message
    assert "6 unexpected keys (head.0.weight" in message and "and 1 more" in message
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # untouched
