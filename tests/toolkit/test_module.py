"""ChimeraModule: the logged loss is the token mean of each optimizer step, gradients are token-normalised
under accumulation, and an MoE aux loss is weighted as ``training_step`` documents."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers.logger import Logger
from torch import Tensor
from torch.utils.data import DataLoader

from tests.conftest import TINY_MODEL
from toolkit.model import build_model
from toolkit.module import ChimeraModule
from toolkit.perf import PerfMonitor

IMG, VOCAB, IMAGE_TOKENS = 5, 64, 4
MOE = {
    **TINY_MODEL["decoder"],
    "pattern": "*E*E",  # attention + MoE, twice
    "ffns": {"moe": {"d_ff": 32, "n_experts": 4, "top_k": 2, "aux_loss_coef": 1.0}},
}


def tiny(**overrides):
    return build_model({**TINY_MODEL, **overrides}, vocab_size=VOCAB, image_token_id=IMG)


def make_batch(rows: list[tuple[int, int, int]], seed: int) -> dict[str, Tensor | None]:
    """rows: (images, text tokens, target tokens) per sample -> a right-padded batch (targets at the end)."""
    g = torch.Generator().manual_seed(seed)
    seqs = [
        [1] + [IMG] * IMAGE_TOKENS * n + torch.randint(6, VOCAB, (t,), generator=g).tolist()
        for n, t, _ in rows
    ]
    T = max(map(len, seqs))
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (s, (_, _, k)) in enumerate(zip(seqs, rows)):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        labels[i, len(s) - k : len(s)] = ids[i, len(s) - k : len(s)]
    n_images = sum(r[0] for r in rows)
    images = torch.rand(n_images, 3, 16, 16, generator=g) if n_images else None
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "images": images}


def concat(*batches: dict) -> dict:
    """One batch holding the samples of all ``batches`` (padded to the longest)."""
    T = max(b["input_ids"].shape[1] for b in batches)

    def pad(x: Tensor, value: int) -> Tensor:
        return F.pad(x, (0, T - x.shape[1]), value=value)

    images = [b["images"] for b in batches if b["images"] is not None]
    return {
        "input_ids": torch.cat([pad(b["input_ids"], 0) for b in batches]),
        "labels": torch.cat([pad(b["labels"], -100) for b in batches]),
        "attention_mask": torch.cat([pad(b["attention_mask"], 0) for b in batches]),
        "images": torch.cat(images) if images else None,
    }


def ce_sum(model, batch) -> tuple[Tensor, int]:
    """Summed next-token cross-entropy over the labelled tokens and their count, written out here (not
    ``token_losses``): log-softmax of position t, gathered at the label of position t + 1."""
    logits = model(batch["input_ids"], batch["images"])
    logp = logits[:, :-1].double().log_softmax(-1)
    targets = batch["labels"][:, 1:]
    valid = targets != -100
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked * valid).sum(), int(valid.sum())


class Recorder(Logger):
    name, version = "recorder", 0

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append((step, dict(metrics)))

    def series(self, key: str) -> dict[int, float]:
        return {step: m[key] for step, m in self.rows if key in m}


def trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        gradient_clip_val=None,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        **kwargs,
    )


# micro-batches of different lengths, image counts and target-token counts
BATCHES = [
    make_batch([(1, 6, 2), (0, 11, 5)], seed=0),
    make_batch([(2, 3, 1)], seed=1),
    make_batch([(1, 9, 6), (1, 4, 1), (0, 5, 3)], seed=2),
    make_batch([(0, 14, 9)], seed=3),
]


def test_logged_train_loss_is_the_token_mean_over_each_optimizer_steps_micro_batches():
    model = tiny()
    initial = copy.deepcopy(model)
    module = ChimeraModule(model, optim={"lr": 0.0}, max_steps=2)  # lr 0: every step sees the initial weights
    recorder = Recorder()
    fit = trainer(max_steps=2, accumulate_grad_batches=2, logger=recorder, log_every_n_steps=1)
    fit.fit(module, DataLoader(BATCHES, batch_size=None))
    losses, counts = recorder.series("train/loss"), recorder.series("train/target_tokens")
    assert sorted(losses) == [0, 1]
    with torch.no_grad():
        for step, micro in enumerate((BATCHES[0:2], BATCHES[2:4])):
            sums = [ce_sum(initial, b) for b in micro]
            token_mean = sum(s for s, _ in sums) / sum(n for _, n in sums)
            mean_of_means = sum(s / n for s, n in sums) / len(sums)
            assert counts[step] == sum(n for _, n in sums)
            assert losses[step] == pytest.approx(float(token_mean), rel=1e-5)
            assert abs(float(mean_of_means - token_mean)) > 1e-3  # the test can tell the two apart


def test_the_module_hands_lightning_a_perf_monitor_with_the_configured_peak():
    module = ChimeraModule(tiny(), optim={"lr": 1e-3}, max_steps=1, config={"perf": {"peak_tflops": 123.0}})
    (monitor,) = module.configure_callbacks()
    assert isinstance(monitor, PerfMonitor) and monitor.peak_tflops == 123.0
    assert ChimeraModule(tiny(), optim={"lr": 1e-3}, max_steps=1).configure_callbacks()[0].peak_tflops is None


# -- MoE aux loss under gradient accumulation ------------------------------------------------------------


class Grab(ChimeraModule):
    """Keeps the gradients as the optimizer gets them (after the token rescale)."""

    def on_before_optimizer_step(self, optimizer):
        super().on_before_optimizer_step(optimizer)
        self.grads = {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None}


def accumulated_grads(aux_weight: float, a: dict, b: dict) -> tuple[dict[str, Tensor], dict]:
    """One optimizer step over micro-batches a then b (accumulate_grad_batches=2); also the initial weights."""
    model = tiny(decoder=MOE)
    initial = copy.deepcopy(model.state_dict())
    module = Grab(model, optim={"lr": 1e-3, "aux_loss_weight": aux_weight}, max_steps=1)
    trainer(max_steps=1, accumulate_grad_batches=2, logger=False).fit(
        module, DataLoader([a, b], batch_size=None)
    )
    return module.grads, initial


def reference_grads(initial: dict, loss_fn) -> dict[str, Tensor]:
    ref = tiny(decoder=MOE)
    ref.load_state_dict(initial)
    loss_fn(ref).backward()
    return {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}


def rel_error(grads: dict[str, Tensor], expected: dict[str, Tensor]) -> float:
    """Worst relative error over the parameter tensors with a non-zero expected gradient."""
    assert set(grads) == set(expected)
    return max(float((grads[n] - g).norm() / g.norm()) for n, g in expected.items() if g.norm() > 0)


def test_moe_with_aux_weight_zero_accumulates_to_the_gradient_of_one_batch_of_both_halves():
    a, b = BATCHES[0], BATCHES[1]
    grads, initial = accumulated_grads(0.0, a, b)

    def big_batch_mean(ref):
        loss, n = ce_sum(ref, concat(a, b))
        return loss / n

    def mean_of_means(ref):
        (la, na), (lb, nb) = ce_sum(ref, a), ce_sum(ref, b)
        return (la / na + lb / nb) / 2

    assert rel_error(grads, reference_grads(initial, big_batch_mean)) < 1e-4
    assert rel_error(grads, reference_grads(initial, mean_of_means)) > 0.05  # the test can fail


def test_moe_aux_loss_weighs_each_micro_batch_by_its_target_tokens():
    """training_step's documented objective: (sum CE + w * sum_mb n_mb * aux_mb) / N over the whole step."""
    a, b = BATCHES[0], BATCHES[1]  # 7 and 1 target tokens
    w = 0.5
    grads, initial = accumulated_grads(w, a, b)

    def parts(ref):
        out = []
        for batch in (a, b):
            loss, n = ce_sum(ref, batch)
            out.append((loss, n, ref.decoder.aux_loss()))  # the aux loss of that forward
        return out

    def documented(ref):
        (la, na, xa), (lb, nb, xb) = parts(ref)
        return (la + lb + w * (na * xa + nb * xb)) / (na + nb)

    def plain_aux_mean(ref):  # what a per-micro-batch (unweighted) aux mean would give
        (la, na, xa), (lb, nb, xb) = parts(ref)
        return (la + lb) / (na + nb) + w * (xa + xb) / 2

    def no_aux(ref):
        (la, na, _), (lb, nb, _) = parts(ref)
        return (la + lb) / (na + nb)

    assert rel_error(grads, reference_grads(initial, documented)) < 1e-4
    assert rel_error(grads, reference_grads(initial, plain_aux_mean)) > 1e-2
    assert rel_error(grads, reference_grads(initial, no_aux)) > 1e-2
