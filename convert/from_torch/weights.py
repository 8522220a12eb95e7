"""Load trained weights (a ``.pth`` / ``.pt`` file) into a classifier, safely by default.

``load_weights(model, path)`` reads the file with ``torch.load(weights_only=True)``, which
cannot run code. It accepts:

- a plain ``state_dict`` (torchvision's published files are these);
- a checkpoint dict holding one under ``state_dict``, ``model_state_dict`` or ``model``;
- keys prefixed by ``module.`` (DataParallel) or ``_orig_mod.`` (torch.compile);
- missing BatchNorm ``num_batches_tracked`` buffers (older torchvision files lack them).

A file holding a pickled ``nn.Module`` needs full unpickling, which can run arbitrary code:
it is loaded only with ``trust_pickle=True`` (``--trust-pickle``). Anything else that goes
wrong (missing, unreadable or truncated file, keys or shapes that do not match the
architecture) raises :class:`~densemap.service.errors.ConversionError` naming the file.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping

import torch
from torch import nn

from densemap.service.errors import ConversionError

CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model")
PREFIXES = ("module.", "_orig_mod.")
SHOWN = 5  # how many offending keys an error message lists


def load_weights(
    model: nn.Module | None, path: str | os.PathLike, *, trust_pickle: bool = False
) -> nn.Module:
    """Load the weights at ``path`` into ``model`` (in place) and return it.

    With ``model=None`` the file must hold a pickled full ``nn.Module`` (and
    ``trust_pickle=True``); that module is returned.
    """
    loaded = _read(path, trust_pickle=trust_pickle)
    if isinstance(loaded, nn.Module):
        if model is None:
            return loaded
        loaded = loaded.state_dict()
    elif model is None:
        raise ConversionError(
            f"{path} holds a state_dict, not a full model: name the architecture "
            "(--arch NAME) so the weights have a module to go into."
        )
    state = _state_dict_of(loaded, path)
    state = _fill_batchnorm_counters(model, _strip_prefixes(state))
    _check_keys_and_shapes(model, state, path)
    model.load_state_dict(state, strict=True)
    return model


def _read(path, *, trust_pickle: bool):
    if not os.path.isfile(path):
        raise ConversionError(f"weights file {path} does not exist (or is not a file).")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" not in str(exc):
            raise _unreadable(path, exc) from None
        if not trust_pickle:
            raise ConversionError(
                f"{path} holds pickled Python objects (such as a full nn.Module), and loading "
                "them can run arbitrary code. If you trust this file, pass --trust-pickle "
                "(trust_pickle=True); better, save model.state_dict() and load that."
            ) from None
    except Exception as exc:  # torch.load raises RuntimeError, EOFError, KeyError, ...
        raise _unreadable(path, exc) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise _unreadable(path, exc) from None


def _unreadable(path, exc: Exception) -> ConversionError:
    detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return ConversionError(
        f"cannot read weights file {path}: it is not a torch checkpoint or it is truncated or "
        f"corrupt ({type(exc).__name__}{': ' + detail if detail else ''}). Save it again with "
        "torch.save(model.state_dict(), path)."
    )


def _state_dict_of(loaded, path) -> dict[str, torch.Tensor]:
    if isinstance(loaded, Mapping) and not _all_tensors(loaded):
        for key in CHECKPOINT_KEYS:
            inner = loaded.get(key)
            if isinstance(inner, nn.Module):
                return inner.state_dict()
            if isinstance(inner, Mapping) and _all_tensors(inner):
                return dict(inner)
    if isinstance(loaded, Mapping) and loaded and _all_tensors(loaded):
        return dict(loaded)
    found = type(loaded).__name__
    if isinstance(loaded, Mapping):
        found += f" with keys {sorted(map(str, loaded))[:SHOWN]}"
    raise ConversionError(
        f"{path} does not hold a state_dict (found {found}): expected a mapping of parameter "
        f"names to tensors, possibly under one of {list(CHECKPOINT_KEYS)}."
    )


def _all_tensors(mapping: Mapping) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in mapping.items())


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in PREFIXES:
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix) :]: value for key, value in state.items()}
    return state


def _fill_batchnorm_counters(model: nn.Module, state: dict) -> dict:
    """Files saved before torch 0.4.1 (torchvision's ResNets) lack num_batches_tracked."""
    filled = dict(state)
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in filled:
            filled[key] = value
    return filled


def _shape_hint(model: nn.Module, state: dict) -> str:
    """Which flag fixes shape mismatches: --input-size (a first FC layer sized by the
    window, e.g. LeNet-5's), --num-classes (the last layer), else --arch."""
    expected = model.state_dict()
    keys = [k for k in expected if state[k].shape != expected[k].shape]
    weights = [
        (tuple(state[k].shape), tuple(expected[k].shape)) for k in keys if k.endswith("weight")
    ]
    if weights and all(len(f) == 2 and f[0] == m[0] and f[1] != m[1] for f, m in weights):
        return (
            "The first fully-connected layer takes another number of inputs: the weights were "
            "trained at another window size; pass it with --input-size (N or HxW)"
        )
    last = [k for k in expected if k.endswith("weight")][-1]
    if all(k.rsplit(".", 1)[0] == last.rsplit(".", 1)[0] for k in keys):
        return "Only the last layer differs: pass the file's class count with --num-classes"
    return "Check --arch, --num-classes and --input-size"


def _check_keys_and_shapes(model: nn.Module, state: dict, path) -> None:
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    mismatched = [
        f"{key}: file {list(state[key].shape)} vs model {list(value.shape)}"
        for key, value in expected.items()
        if key in state and state[key].shape != value.shape
    ]
    if not (missing or unexpected or mismatched):
        return
    parts = []
    for label, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", mismatched),
    ):
        if items:
            more = f" and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
            parts.append(f"{len(items)} {label} ({', '.join(items[:SHOWN])}{more})")
    hint = "Check --arch (and --num-classes)"
    if mismatched and not missing and not unexpected:
        hint = _shape_hint(model, state)
    raise ConversionError(
        f"weights {path} do not match the architecture ({type(model).__name__}): "
        f"{'; '.join(parts)}. {hint}."
    )
