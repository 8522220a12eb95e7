"""Which onnxruntime is installed: checked once, before the module is first imported.

densemap's runtime is an extra, chosen at install: ``densemap[cpu]`` (the ``onnxruntime``
distribution) or ``densemap[gpu]`` (``onnxruntime-gpu``, Linux x86_64; it runs on the CPU
too, with identical maps). Both distributions install the same module, ``onnxruntime``, one
over the other, so with both installed (or after uninstalling one of them, which deletes
files they share) ``import onnxruntime`` gives a broken module that fails far from the cause
(``AttributeError: module 'onnxruntime' has no attribute 'get_available_providers'``).

Every engine module reaches onnxruntime through :data:`ort` here (and the converter through
:func:`import_onnxruntime`), so the installed distributions are read first
(``importlib.metadata``; no import) and a wrong install fails with the command that fixes it.
The client (:mod:`densemap.service.client`) never imports this module: it needs no runtime.
"""

from __future__ import annotations

import importlib
from importlib import metadata
from types import ModuleType

from densemap.service.errors import RuntimeNotInstalled

MODULE = "onnxruntime"
# What a densemap install should hold: exactly one of these (any other distribution that
# installs the module `onnxruntime`, such as onnxruntime-directml, counts as one too).
CPU_PACKAGE = "onnxruntime"
GPU_PACKAGE = "onnxruntime-gpu"
INSTALL_FIX = (
    "pip install 'densemap[cpu]' (onnxruntime), or 'densemap[gpu]' (onnxruntime-gpu, "
    "Linux x86_64: CUDA, or the CPU with identical maps)"
)


def _normalized(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _installs_module(dist: metadata.Distribution) -> bool:
    """Whether ``dist`` installs the top-level module ``onnxruntime`` (onnxruntime-genai or
    onnxruntime-extensions install other modules and do not count)."""
    top_level = dist.read_text("top_level.txt")
    if top_level is not None:
        return MODULE in top_level.split()
    return any(f.parts and f.parts[0] == MODULE for f in dist.files or ())


def installed_packages() -> list[str]:
    """Names of the installed distributions that provide the module ``onnxruntime``."""
    found = set()
    for dist in metadata.distributions():
        name = _normalized(dist.metadata["Name"] or "")
        if name.startswith(("onnxruntime", "ort-")) and _installs_module(dist):
            found.add(name)
    return sorted(found)


def check_installed() -> str:
    """The one onnxruntime distribution installed; RuntimeNotInstalled naming the fix when
    there is none or more than one."""
    packages = installed_packages()
    if not packages:
        raise RuntimeNotInstalled(
            "densemap's engine needs onnxruntime and none is installed (the client alone "
            f"needs none): {INSTALL_FIX}"
        )
    if len(packages) > 1:
        names = " and ".join(packages)
        raise RuntimeNotInstalled(
            f"{names} are both installed: they install the same module 'onnxruntime' over "
            f"each other, which breaks it. Keep one: pip uninstall -y {' '.join(packages)}, "
            f"then pip install {GPU_PACKAGE} (Linux x86_64, CUDA or CPU) or "
            f"pip install {CPU_PACKAGE} (as densemap[gpu] / densemap[cpu] do)"
        )
    return packages[0]


def import_onnxruntime() -> ModuleType:
    """``onnxruntime``, after :func:`check_installed`; RuntimeNotInstalled when the module
    the one distribution installed is incomplete (the other one was uninstalled over it)."""
    package = check_installed()
    try:
        module = importlib.import_module(MODULE)
    except ImportError as exc:
        module, problem = None, f"import onnxruntime: {exc}"
    else:
        missing = [
            n for n in ("InferenceSession", "get_available_providers") if not hasattr(module, n)
        ]
        problem = f"it has no {' or '.join(missing)}" if missing else None
    if problem is not None:
        version = metadata.version(package)
        raise RuntimeNotInstalled(
            f"{package} {version} is installed but its module 'onnxruntime' is incomplete "
            f"({problem}; uninstalling a second onnxruntime package deletes files they share): "
            f"pip install --force-reinstall --no-deps {package}=={version}"
        )
    return module


ort = import_onnxruntime()
