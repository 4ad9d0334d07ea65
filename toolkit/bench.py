"""``chimera bench``: benchmarks users run on their own hardware. Each prints its figures with the command
that made them and compares in one run (ratios), because shared machines are noisy.

- ``mixers``: Mamba-1 / Mamba-2 CPU paths against their references (see ``bench_mixers.py``), and prefill time
  of a 1:7 hybrid against a Transformer of equal width and depth as the prompt grows.
- ``model``: the toolkit's Lightning training step against a plain PyTorch loop on the same model and batch.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch


def timed(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds (after ``warmup`` untimed calls)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _decoder(pattern: str, d_model: int, n_layers: int, device: str):
    from toolkit.registry import build

    node = {
        "name": "hybrid",
        "d_model": d_model,
        "n_layers": n_layers,
        "pattern": pattern,
        "vocab_size": 256,
        "mixers": {"attention": {"n_heads": max(1, d_model // 64)}, "mamba": {"d_state": 16}},
        "ffns": {"mlp": {}},
    }
    return build("decoder", node, "bench.decoder").to(device).eval()


def bench_prefill(
    lengths: Sequence[int] = (1024, 4096, 16384),
    d_model: int = 128,
    n_layers: int = 8,
    device: str | None = None,
) -> dict[str, Any]:
    """Prefill (one forward over the prompt, no grad) of ``hybrid_1_7`` vs ``transformer``, B=1."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    hybrid = _decoder("hybrid_1_7", d_model, n_layers, device)
    transformer = _decoder("transformer", d_model, n_layers, device)
    out: dict[str, Any] = {
        "d_model": d_model,
        "n_layers": n_layers,
        "hybrid_pattern": hybrid.pattern,
        "by_length": {},
    }
    for L in lengths:
        x = torch.randn(1, L, d_model, device=device)
        repeats = 3 if L <= 4096 else 1
        with torch.no_grad():
            t_h = timed(lambda x=x: hybrid(x), repeats=repeats)
            t_t = timed(lambda x=x: transformer(x), repeats=repeats)
        out["by_length"][str(L)] = {
            "hybrid_s": t_h,
            "transformer_s": t_t,
            "hybrid_over_transformer": t_h / t_t,
        }
    return out


def bench_mixers(quick: bool = False) -> dict[str, Any]:
    """Everything ``chimera bench mixers`` reports, under stable keys scripts can read."""
    from toolkit.bench_mixers import run_mixer_bench

    result = run_mixer_bench(quick=quick)
    prefill = bench_prefill(lengths=(256, 512, 1024) if quick else (1024, 4096, 16384), n_layers=8)
    result["prefill_config"] = {k: v for k, v in prefill.items() if k != "by_length"}
    result["prefill"] = prefill["by_length"]
    result["threads"] = torch.get_num_threads()
    return result


def format_mixers(result: dict[str, Any]) -> str:
    from toolkit.bench_mixers import format_table

    lines = [
        format_table(result),
        "",
        "prefill, hybrid 1:7 vs Transformer (equal width and depth, B=1, no grad)",
    ]
    cfg = result["prefill_config"]
    lines.append(
        f"  d_model {cfg['d_model']}, {cfg['n_layers']} layers, hybrid pattern {cfg['hybrid_pattern']}"
    )
    lines.append(f"  {'L':>7} {'hybrid s':>10} {'transformer s':>14} {'hybrid/transformer':>19}")
    for L, row in result["prefill"].items():
        lines.append(
            f"  {L:>7} {row['hybrid_s']:>10.3f} {row['transformer_s']:>14.3f} {row['hybrid_over_transformer']:>19.2f}"
        )
    return "\n".join(lines)


class _PlainLoop:
    """A hand-written PyTorch training step: same model copy, batch, loss, optimizer, schedule and clipping."""

    def __init__(
        self, model, module_cls, config: dict[str, Any], batch: dict[str, Any], device, precision: str, clip
    ):
        module = module_cls(
            model, optim=config["optim"], max_steps=int(config["trainer"]["max_steps"]), config=config
        )
        opt = module.configure_optimizers()  # the toolkit's own AdamW groups and schedule (no trainer needed)
        self.optimizer, self.schedule = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
        self.model, self.batch, self.device, self.clip = model.to(device).train(), batch, device, clip
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.autocast = precision.startswith(("bf16", "16")) and precision.endswith("mixed")
        self.dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16
        if precision.startswith(("bf16", "16")) and precision.endswith("true"):
            model.to(self.dtype)

    def step(self) -> float:
        from toolkit.module import token_losses

        _sync(self.device)
        t0 = time.perf_counter()
        batch, device = self.batch, self.device
        ids = batch["input_ids"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        images = batch["images"].to(device, non_blocking=True) if batch.get("images") is not None else None
        with torch.autocast(device.type, dtype=self.dtype, enabled=self.autocast):
            logits = self.model(ids, images)
        loss_sum, n_tokens, _ = token_losses(logits, labels)
        (loss_sum / n_tokens.clamp(min=1)).backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        _sync(device)
        return time.perf_counter() - t0


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _paired_steps(
    lightning_model, plain: _PlainLoop, module_cls, config, batch, steps, accelerator, precision, clip
):
    """Alternate one step of the toolkit's Lightning training (ChimeraModule under a Trainer, as ``chimera
    train`` builds it, minus checkpoint and MLflow I/O) with one plain step; returns both lists of times.

    A Lightning step is the wall time from the end of one ``on_train_batch_end`` to the next (loop, hooks,
    data fetch, forward, backward, rescale, clipping, optimizer); the plain step runs in between, untimed by
    the Lightning clock. Paired steps see the same machine load, which matters on a shared machine.
    """
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    lightning_times: list[float] = []
    plain_times: list[float] = []

    class Alternate(pl.Callback):
        def __init__(self) -> None:
            self.mark: float | None = None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            _sync(pl_module.device)
            if self.mark is not None:
                lightning_times.append(time.perf_counter() - self.mark)
            plain_times.append(plain.step())
            self.mark = time.perf_counter()

    module = module_cls(
        lightning_model, optim=config["optim"], max_steps=int(config["trainer"]["max_steps"]), config=config
    )
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=precision,
        max_steps=steps + 2,  # one warmup step each, and the first Lightning interval has no start mark
        limit_val_batches=0,
        gradient_clip_val=clip,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Alternate()],
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        log_every_n_steps=int(config["trainer"].get("log_every_n_steps", 50)),
    )
    trainer.fit(module, train_dataloaders=DataLoader([batch] * (steps + 2), batch_size=None))
    return lightning_times[1:], plain_times[2:]


def bench_model(config: str, overrides: Sequence[str] = (), steps: int = 20) -> dict[str, Any]:
    """The toolkit's Lightning training step vs a plain PyTorch loop, same model, batch and optimizer.

    Both start from the same initial weights and alternate step by step (``_paired_steps``), so a noisy
    machine slows both alike. Step times are medians over ``steps`` steps after one warmup step each;
    ``overhead_ratio = lightning_step_s / plain_step_s`` (target: <= 1.05) and ``paired_ratio_median`` is the
    median of the per-step ratios. One device, whatever ``strategy`` the experiment names; the experiment's
    ``log_every_n_steps`` applies (``self.log`` costs ~0.5 ms per metric on the steps that log).
    """
    import copy
    import warnings

    import lightning.pytorch as pl
    from omegaconf import OmegaConf

    from toolkit.assemble import build_parts
    from toolkit.model import count_params
    from toolkit.module import ChimeraModule
    from toolkit.plan import load_plan
    from toolkit.strategies import apply_activation_checkpointing

    plan = load_plan(config, overrides)
    cfg = plan.stages[0].cfg  # a recipe is benchmarked on its first stage
    resolved = OmegaConf.to_container(cfg, resolve=True)
    pl.seed_everything(int(cfg.seed), verbose=False)
    model, datamodule = build_parts(cfg, plan.tokenizer)
    if cfg.strategy.get("activation_checkpointing"):
        apply_activation_checkpointing(model)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    on_cuda = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    device = torch.device("cuda" if on_cuda else "cpu")
    precision = str(cfg.trainer.get("precision", "32-true"))
    clip = cfg.trainer.get("gradient_clip_val")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = _PlainLoop(copy.deepcopy(model), ChimeraModule, resolved, batch, device, precision, clip)
        lightning_times, plain_times = _paired_steps(
            copy.deepcopy(model),
            plain,
            ChimeraModule,
            resolved,
            batch,
            steps,
            "gpu" if on_cuda else "cpu",
            precision,
            clip,
        )
    plain_s, lightning_s = statistics.median(plain_times), statistics.median(lightning_times)
    total, trainable = count_params(model)
    return {
        "config": str(config),
        "overrides": list(overrides),
        "device": torch.cuda.get_device_name(device)
        if on_cuda
        else f"cpu ({torch.get_num_threads()} threads)",
        "precision": precision,
        "params": total,
        "trainable_params": trainable,
        "batch": {
            "size": int(batch["input_ids"].shape[0]),
            "seq_len": int(batch["input_ids"].shape[1]),
            "images": 0 if batch.get("images") is None else int(batch["images"].shape[0]),
        },
        "steps": steps,
        "plain_step_s": plain_s,
        "lightning_step_s": lightning_s,
        "overhead_ratio": lightning_s / plain_s,
        "paired_ratio_median": statistics.median(lt / pt for lt, pt in zip(lightning_times, plain_times)),
        "plain_step_s_all": plain_times,
        "lightning_step_s_all": lightning_times,
    }


def format_model(result: dict[str, Any]) -> str:
    ratio = result["overhead_ratio"]
    batch = result["batch"]
    verdict = "ok" if ratio <= 1.05 else "ABOVE"
    lines = [
        f"Lightning step vs plain PyTorch loop: {result['config']} {' '.join(result['overrides'])}".rstrip(),
        f"  device {result['device']}, precision {result['precision']}, {result['params']:,} params "
        f"({result['trainable_params']:,} trainable)",
        f"  batch {batch['size']} x {batch['seq_len']} tokens, {batch['images']} images; "
        f"{result['steps']} steps each, alternating, medians",
        f"  plain loop      {result['plain_step_s'] * 1e3:9.2f} ms/step",
        f"  Lightning step  {result['lightning_step_s'] * 1e3:9.2f} ms/step",
        f"  overhead_ratio  {ratio:9.3f}  ({(ratio - 1) * 100:+.1f}%; target <= 1.05: {verdict}); "
        f"median of per-step ratios {result['paired_ratio_median']:.3f}",
    ]
    return "\n".join(lines)
