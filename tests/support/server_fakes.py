"""Engines that block until released (to hold a request in flight), and a repository wrapper."""

from __future__ import annotations

import threading
import time

from densemap.service.engine import ModelRepository, ScoreOptions
from densemap.service.errors import Cancelled

BLOCK_LIMIT_SECONDS = 20.0  # a blocked engine call never waits longer than this


class BlockingEngine:
    """Delegates to a real engine, but ``score`` waits for ``release`` (or the cancel hook)."""

    def __init__(self, engine, release: threading.Event) -> None:
        self._engine = engine
        self.release = release
        self.started = threading.Event()
        self.calls = 0

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def score(self, image, options: ScoreOptions = ScoreOptions(), *, cancel=None):
        self.calls += 1
        self.started.set()
        deadline = time.monotonic() + BLOCK_LIMIT_SECONDS
        while not self.release.wait(0.01):
            if cancel is not None and cancel():
                raise Cancelled("stopped by the cancel hook while blocked")
            if time.monotonic() > deadline:
                raise AssertionError("the test never released the blocked engine")
        return self._engine.score(image, options, cancel=cancel)


class BlockingRepository:
    """A real repository whose engines are :class:`BlockingEngine` sharing one release."""

    def __init__(self, repository: ModelRepository, release: threading.Event) -> None:
        self._repository = repository
        self._release = release
        self._engines: dict[str, BlockingEngine] = {}

    @property
    def names(self) -> list[str]:
        return self._repository.names

    @property
    def errors(self) -> dict[str, str]:
        return self._repository.errors

    def reload(self):
        return self._repository.reload()

    def get(self, name: str) -> BlockingEngine:
        if name not in self._engines:
            self._engines[name] = BlockingEngine(self._repository.get(name), self._release)
        return self._engines[name]


def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``predicate`` every 10 ms (bounded); fail the test when it stays false."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)
