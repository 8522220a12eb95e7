"""What "ready" promises: the server serves at least one model, and every model named in
``--require-models``.

Readiness (the health services ``readiness`` and "", KServe ``ServerReady``) is what a load
balancer or Kubernetes routes traffic by; a server whose repository is empty, or whose every
model failed to load, answers each scoring call NOT_FOUND and must not say it is ready.
Liveness is another matter: such a server still works, and restarting it fixes nothing.
The server re-evaluates readiness after its first load and after every reload (SIGHUP,
``--poll-seconds``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Readiness:
    """The outcome of one evaluation: ``problem`` is None when ready, else why not."""

    problem: str | None
    missing: tuple[str, ...] = ()  # required models that are not served

    @property
    def ready(self) -> bool:
        return self.problem is None


def evaluate(
    served: Iterable[str],
    failures: Mapping[str, str],
    required: Iterable[str] = (),
    repository: str = "the model repository",
) -> Readiness:
    """Readiness of a server serving ``served``, whose models ``failures`` failed to load
    (name -> message), that must serve each of ``required``."""
    served = set(served)
    missing = tuple(name for name in required if name not in served)
    problems = []
    if missing:
        reasons = [
            f"{name!r} failed to load ({failures[name]})"
            if name in failures
            else f"{name!r} is not in {repository}"
            for name in missing
        ]
        problems.append(f"required model(s) not served (--require-models): {'; '.join(reasons)}")
    if not served:
        if failures:
            names = ", ".join(repr(name) for name in sorted(failures))
            problems.append(
                f"no model is served: every model of {repository} failed to load ({names}); "
                "fix their files, then reload (SIGHUP)"
            )
        else:
            problems.append(
                f"no model is served: {repository} holds no model folder (NAME/model.onnx); "
                "add one, then reload (SIGHUP)"
            )
    return Readiness("; ".join(problems) or None, missing)
