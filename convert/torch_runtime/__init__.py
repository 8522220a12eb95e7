"""The torch runtime: a dense model run by torch behind the engine's session API.

It lives beside the converter, the half of densemap that depends on torch: service/ never
imports torch. The engine loads this package by name, and only for
``EngineConfig(runtime="torch")`` (:data:`densemap.service.engine.options.RUNTIME_MODULES`);
without torch installed that load fails with the install hint.
"""

from densemap.convert.torch_runtime.session import TORCH_MISSING, open_torch_net

open_net = open_torch_net  # the entry point every runtime module names alike

__all__ = ["TORCH_MISSING", "open_net", "open_torch_net"]
