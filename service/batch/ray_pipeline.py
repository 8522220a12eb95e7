"""Batch scoring on Ray Data: the same per-image work as local mode, on an actor pool.

Pipeline::

    from_items([{source, relpath}, ...])            # paths only; resume filtered them
      .map_batches(ScoreActor, compute=ActorPoolStrategy(size=N),
                   num_gpus=1 (with --gpus), num_cpus=0.5, batch_size=4)
      .iter_batches()                                # summary rows stream back here

Each actor holds one engine (one onnxruntime session) and runs the local
:func:`~densemap.service.batch.pipeline.run_pipeline` on its batch, so it reads, decodes and writes
in threads around inference and writes exactly the files local mode writes. Inputs, the
output folder and ``--models`` must be paths every node can see (a shared file system);
the driver only receives the small summary rows.

Needs the ``distributed`` extra (``pip install 'densemap[distributed]'``).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from densemap.service.batch.pipeline import PipelineConfig, run_pipeline
from densemap.service.batch.scorers import ModelChoice, open_engine_scorer
from densemap.service.batch.walk import ImageJob
from densemap.service.batch.writer import OutputConfig, ResultWriter
from densemap.service.engine.options import ScoreOptions
from densemap.service.errors import DensemapError, InvalidOption

logger = logging.getLogger("densemap.score")
ACTOR_THREADS = 2  # decode/write threads inside each actor


@dataclass(frozen=True)
class ActorSpec:
    """What every actor needs (pickled once per actor)."""

    model: ModelChoice
    output: OutputConfig
    options: ScoreOptions
    debug: bool = False


class ScoreActor:
    """One engine per actor; each call scores a batch of paths and returns summary rows."""

    def __init__(self, spec: ActorSpec) -> None:
        self.spec = spec
        self.scorer = open_engine_scorer(spec.model)
        self.writer = ResultWriter(spec.output)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        jobs = [
            ImageJob(source=str(s), relpath=str(r))
            for s, r in zip(batch["source"], batch["relpath"], strict=True)
        ]
        rows: list[dict] = []
        run_pipeline(
            jobs,
            scorer=self.scorer,
            writer=self.writer,
            options=self.spec.options,
            report=rows.append,
            config=PipelineConfig(workers=ACTOR_THREADS, debug=self.spec.debug),
        )
        return {"row": np.array([json.dumps(row) for row in rows], dtype=object)}


_RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def _drop_auth_default_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Token authentication is enabled for this Ray")


def _drop_progress_bar_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Progress bars disabled")


def _connect(address: str | None):
    """Join the cluster at ``address`` (None: RAY_ADDRESS, else a new local one)."""
    import ray

    if ray.is_initialized():
        return ray
    kwargs = {"log_to_driver": True, "logging_level": logging.WARNING}
    starts_local = address == "local" or (not address and not os.environ.get("RAY_ADDRESS"))
    if starts_local:
        kwargs["include_dashboard"] = False
        # A new local cluster uses token auth by default (a token in ~/.ray/auth_token) and
        # Ray warns about that default on every run: densemap keeps the default, not the
        # warning. An explicit RAY_AUTH_MODE is Ray's to honour, as always.
        logging.getLogger(_RAY_AUTH_LOGGER).addFilter(_drop_auth_default_warning)
    try:
        ray.init(address=address or None, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise InvalidOption(f"cannot connect to Ray at {address or 'RAY_ADDRESS'}: {exc}") from None
    return ray


def _pool_size(ray, actors: int | None, gpus: bool) -> int:
    if actors:
        return actors
    if gpus:
        count = int(ray.cluster_resources().get("GPU", 0))
        if count < 1:
            raise InvalidOption("--gpus: the Ray cluster has no GPU; drop --gpus or add GPU nodes")
        return count
    return max(1, sum(1 for node in ray.nodes() if node.get("Alive")))


def _score_dataset(ray, items: list[dict], spec: ActorSpec, *, size: int, blocks: int, config):
    from ray.data import ActorPoolStrategy

    return ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        ScoreActor,
        fn_constructor_kwargs={"spec": spec},
        compute=ActorPoolStrategy(size=size),
        batch_size=config.batch_size,
        batch_format="numpy",
        num_cpus=config.actor_cpus,
        num_gpus=1 if config.gpus else 0,
        # Ray Data restarts dead actors forever by default (max_restarts=-1, retrying their
        # tasks forever too): an image that crashes its actor (a native fault, the node's
        # OOM killer) would loop, and Ray logs an error on every run because a restarted
        # actor needs constructor arguments held in the object store (Ray Data puts them
        # there whatever their size). With no restarts a dead actor ends the run with the
        # error below: outputs written so far are kept and a rerun resumes.
        max_restarts=0,
    )


def run_ray(
    jobs: list[ImageJob], *, request, output: OutputConfig, report: Callable, halt=None
) -> None:
    """Score ``jobs`` on Ray, calling ``report(row)`` on the driver as rows stream back;
    stops taking rows once ``halt()`` (the run's own files cannot be written)."""
    if not jobs:
        return
    config = request.ray
    ray = _connect(config.address)
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False  # densemap's own progress line counts the images
    context.print_on_execution_start = False
    # Ray Data's INFO lines (execution started/finished) and its warning that the progress
    # bars are off (as set above) say nothing to a densemap user; its other warnings stay.
    if not request.debug:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").addFilter(_drop_progress_bar_warning)
    size = min(_pool_size(ray, config.actors, config.gpus), len(jobs))
    spec = ActorSpec(
        model=request.model, output=output, options=request.options, debug=request.debug
    )
    items = [{"source": job.source, "relpath": job.relpath} for job in jobs]
    blocks = max(1, min(len(items), size * 4, -(-len(items) // config.batch_size)))
    with warnings.catch_warnings():
        # max_restarts has no named parameter in map_batches yet (Ray 2.60 calls **kwargs
        # deprecated "in favour of the named parameters" but names none for it).
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        dataset = _score_dataset(ray, items, spec, size=size, blocks=blocks, config=config)
    logger.info("Ray: %d image(s) on %d actor(s)", len(items), size)
    try:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            for text in batch["row"]:
                report(json.loads(text))
            if halt is not None and halt():
                break
    except DensemapError:
        raise
    except Exception as exc:  # an actor that cannot start (model missing on a node...)
        summary = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise DensemapError(
            f"the Ray pipeline failed ({type(exc).__name__}: {summary}); outputs written so "
            "far are kept: fix the cause and rerun to resume (--debug shows the traceback)"
        ) from exc
