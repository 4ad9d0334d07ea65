"""``chimera bench data``: does the data loader keep up with the model it feeds?

Three measurements on one experiment, in one run (a shared machine's load changes between runs, not much
within one), on the experiment's first stage:

1. ``model``: the training step alone (forward, backward, clipping, optimizer and schedule: ``bench``'s
   ``_PlainLoop``) on one fixed batch, median over ``steps`` steps; no loader worker exists yet.
2. ``loader``: the experiment's own training loader (``ChimeraDataModule.train_dataloader()``: dataset,
   sampler, collator, ``workers`` worker processes) drained as fast as it delivers, for ``batches`` batches
   after the first one (whose worker start-up is reported apart, ``first_batch_s``); the main process does
   nothing else.
3. ``fed``: the model's steps fed by that same loader, one batch per step (what training does); on a machine
   with few cores the workers and the model compete for them, which is what this shows.

``loader_over_model = loader.samples_per_s / model.samples_per_s`` is the headroom: above 1 the loader can
feed the model; the issue's target is 5 with 2 workers. ``fed_over_model`` below 1 means training waits for
data (or the workers slow the step down by taking its cores).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

TARGET = 5.0  # loader samples/s over model samples/s, with 2 workers (the data issue's target)


def _count(batch: dict[str, Any]) -> tuple[int, int]:
    """(samples, images) of a collated batch."""
    images = batch.get("images")
    return int(batch["input_ids"].shape[0]), 0 if images is None else int(images.shape[0])


def bench_data(
    config: str, overrides: Sequence[str] = (), *, workers: int = 2, batches: int = 30, steps: int = 10
) -> dict[str, Any]:
    """Loader samples/s and images/s beside the model's training-step samples/s on the same experiment.

    Args:
        config: the experiment YAML; overrides: ``key=value`` strings as on the command line.
        workers: DataLoader worker processes (sets ``data.num_workers``).
        batches: batches timed for the loader (after its first batch).
        steps: training steps timed for the model alone and for the model fed by the loader (each after
            two untimed warm-up steps).

    Returns:
        a dict with stable keys: ``loader.samples_per_s``, ``loader.images_per_s``, ``model.samples_per_s``,
        ``model.images_per_s``, ``fed.samples_per_s``, ``loader_over_model``, ``fed_over_model``,
        ``target``, ``meets_target``, and the context (``config``, ``workers``, ``device``, ``threads``,
        ``cpus``, ``batch``).
    """
    import copy
    import warnings

    import lightning.pytorch as pl
    from omegaconf import OmegaConf

    from toolkit.assemble import build_parts
    from toolkit.bench import _PlainLoop, _sync
    from toolkit.module import ChimeraModule
    from toolkit.plan import load_plan

    if workers < 0 or batches < 1 or steps < 1:
        raise ValueError(
            f"workers >= 0, batches >= 1, steps >= 1 expected, got {workers}, {batches}, {steps}"
        )
    plan = load_plan(config, [*overrides, f"data.num_workers={int(workers)}"])
    cfg = plan.stages[0].cfg  # a recipe is benchmarked on its first stage
    resolved = OmegaConf.to_container(cfg, resolve=True)
    pl.seed_everything(int(cfg.seed), verbose=False)
    model, datamodule = build_parts(cfg, plan.tokenizer)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    # the model's batch: the loader's first batch, collated in this process (no worker started yet)
    first = list(loader.sampler)[: loader.batch_size]
    batch = loader.collate_fn([loader.dataset[i] for i in first])
    size, n_images = _count(batch)

    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    on_cuda = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    device = torch.device("cuda" if on_cuda else "cpu")
    precision = str(cfg.trainer.get("precision", "32-true"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = _PlainLoop(
            copy.deepcopy(model),
            ChimeraModule,
            resolved,
            batch,
            device,
            precision,
            cfg.trainer.get("gradient_clip_val"),
        )
        # 1. the model alone
        for _ in range(2):
            plain.step()
        step_s = [plain.step() for _ in range(steps)]

        # 2. the loader alone
        available = len(loader)
        it = iter(loader)
        t0 = time.perf_counter()
        next(it)
        first_batch_s = time.perf_counter() - t0
        timed = min(batches, max(available - 1, 0))
        samples = images = 0
        t0 = time.perf_counter()
        for _ in range(timed):
            s, i = _count(next(it))
            samples, images = samples + s, images + i
        loader_s = time.perf_counter() - t0

        # 3. the model fed by the loader
        fed_steps = min(steps, max(available - 1 - timed - 2, 0))
        fed_samples, fed_s = 0, 0.0
        if fed_steps:
            for _ in range(2):
                plain.batch = next(it)
                plain.step()
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(fed_steps):
                plain.batch = next(it)
                fed_samples += _count(plain.batch)[0]
                plain.step()
            fed_s = time.perf_counter() - t0
        del it  # stops the workers

    model_step_s = statistics.median(step_s)
    model_rate = size / model_step_s
    loader_rate = samples / loader_s if timed else None  # None: the epoch has too few batches to time
    fed_rate = fed_samples / fed_s if fed_steps else None
    ratio = loader_rate / model_rate if loader_rate is not None else None
    return {
        "config": str(config),
        "overrides": list(overrides),
        "workers": int(workers),
        "device": torch.cuda.get_device_name(device) if on_cuda else "cpu",
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "precision": precision,
        "batch": {"size": size, "seq_len": int(batch["input_ids"].shape[1]), "images": n_images},
        "loader": {
            "samples_per_s": loader_rate,
            "images_per_s": images / loader_s if timed else None,
            "batches": timed,
            "samples": samples,
            "images": images,
            "wall_s": loader_s,
            "first_batch_s": first_batch_s,
        },
        "model": {
            "samples_per_s": model_rate,
            "images_per_s": n_images / model_step_s,
            "step_s": model_step_s,
            "steps": steps,
            "step_s_all": step_s,
        },
        "fed": {"samples_per_s": fed_rate, "steps": fed_steps, "wall_s": fed_s},
        "loader_over_model": ratio,
        "fed_over_model": fed_rate / model_rate if fed_rate is not None else None,
        "target": TARGET,
        "meets_target": ratio is not None and ratio >= TARGET,
    }


def format_data(result: dict[str, Any]) -> str:
    """The human-readable table ``chimera bench data`` prints."""
    b, loader, model, fed = result["batch"], result["loader"], result["model"], result["fed"]
    ratio = result["loader_over_model"]
    verdict = "ok" if result["meets_target"] else "BELOW"

    def num(value: float | None, fmt: str = "9.1f") -> str:
        return "n/a".rjust(int(fmt.split(".")[0] or 0)) if value is None else format(value, fmt)

    lines = [
        f"data loader vs training step: {result['config']} {' '.join(result['overrides'])}".rstrip(),
        f"  device {result['device']}, {result['threads']} torch threads, {result['cpus']} CPUs, "
        f"{result['workers']} loader workers, precision {result['precision']}",
        f"  batch {b['size']} samples x {b['seq_len']} tokens, {b['images']} images",
        f"  loader         {num(loader['samples_per_s'])} samples/s {num(loader['images_per_s'])} images/s "
        f"({loader['batches']} batches; first batch {loader['first_batch_s']:.2f} s with worker start-up)",
        f"  model step     {model['samples_per_s']:9.1f} samples/s {model['images_per_s']:9.1f} images/s "
        f"({model['step_s'] * 1e3:.1f} ms/step, median of {model['steps']})",
        f"  model fed      {num(fed['samples_per_s'])} samples/s ({fed['steps']} steps drawing batches from the "
        f"loader: fed_over_model {num(result['fed_over_model'], '.2f')})",
        f"  loader_over_model {num(ratio, '6.2f')}  (target >= {result['target']:g} with 2 workers: {verdict})",
    ]
    return "\n".join(lines)
