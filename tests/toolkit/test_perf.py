"""toolkit.perf: the datasheet peak, the MFU arithmetic, FlopsModel per part (trainable or frozen, pooled after
the connector, tied embeddings, a plugin mixer's own sequence cost) and PerfMonitor under a real Trainer."""

from __future__ import annotations

import time
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers.logger import Logger
from torch import Tensor, nn
from torch.utils.data import DataLoader

from tests.conftest import TINY_MODEL
from toolkit import perf, registry
from toolkit.model import PARTS, build_model, count_params
from toolkit.module import ChimeraModule, select_trainable
from toolkit.perf import FlopsModel, PerfMonitor, PerfWindow, StepCounts, peak_tflops

IMG, VOCAB = 5, 64
ENC_TOKENS, POOLED = 16, 4  # TINY_MODEL: 16 px / patch 4 = 4x4 patches, 2D-pooled by 2 -> 2x2
D_ATTN = 32  # TINY_MODEL's one attention layer: 2 heads x 16


def tiny(**overrides):
    return build_model({**TINY_MODEL, **overrides}, vocab_size=VOCAB, image_token_id=IMG)


def numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def decoder_params(model) -> int:
    """Decoder weights that are matmuls: everything but the embedding lookup (untied model)."""
    return numel(model.decoder) - model.decoder.embed_tokens.weight.numel()


# -- peak and MFU arithmetic ------------------------------------------------------------------------------


def test_peak_tflops_reads_the_datasheet_of_a_known_gpu_for_the_precision(monkeypatch):
    name = "NVIDIA H100 80GB HBM3"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_tflops("bf16-mixed") == 989.4 and peak_tflops("bf16-true") == 989.4
    assert peak_tflops("16-mixed") == 989.4
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert peak_tflops("32-true") == 494.7
        torch.backends.cuda.matmul.allow_tf32 = False
        assert peak_tflops("32-true") == 66.9
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    name = "NVIDIA A100-SXM4-80GB"
    assert peak_tflops("bf16-mixed") == 312.0 and peak_tflops("32-true") == 19.5
    name = "NVIDIA H200"
    assert peak_tflops("bf16-mixed") == 989.4
    name = "NVIDIA GeForce RTX 4090"  # not in the table: no guess
    assert peak_tflops("bf16-mixed") is None
    assert peak_tflops("bf16-mixed", torch.device("cpu")) is None  # a CUDA machine training on its CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert peak_tflops("bf16-mixed") is None


def test_perf_window_turns_summed_steps_into_rates_tflops_and_mfu():
    window = PerfWindow()
    window.add(2.0, StepCounts(samples=8, images=4, text_tokens=1000, sum_sq_lengths=9e4), flops=3e12)
    window.add(3.0, StepCounts(samples=4, images=6, text_tokens=500, sum_sq_lengths=1e4), flops=7e12)
    metrics = window.metrics(world_size=2, peak_tflops=0.5, peak_mem_gb=1.25)
    assert metrics == pytest.approx(
        {
            "perf/step_time_s": 5.0 / 2,
            "perf/tokens_per_s": 1500 / 5.0,
            "perf/samples_per_s": 12 / 5.0,
            "perf/images_per_s": 10 / 5.0,
            "perf/tflops": 10e12 / 5.0 / 2 / 1e12,  # per device: 1.0
            "perf/mfu": 1.0 / 0.5,
            "perf/peak_mem_gb": 1.25,
        }
    )
    assert "perf/mfu" not in window.metrics(world_size=2)  # no known peak: no MFU


def test_step_counts_travel_as_one_tensor_in_field_order():
    counts = StepCounts(
        target_tokens=torch.tensor(7),
        loss_sum=torch.tensor(3.5),
        samples=2,
        images=3,
        text_tokens=torch.tensor(20),
        sum_sq_lengths=torch.tensor(208.0, dtype=torch.float64),
        truncated=torch.tensor(1),
        skipped=3,
        over_budget=torch.tensor(2),
    )
    vector = counts.to_tensor()
    assert vector.dtype == torch.float64 and vector.tolist() == [
        7.0,
        3.5,
        2.0,
        3.0,
        20.0,
        208.0,
        1.0,
        3.0,
        2.0,
    ]
    back = StepCounts.from_tensor(vector + vector)  # what summing micro-batches or ranks does
    assert back == StepCounts(14.0, 7.0, 4.0, 6.0, 40.0, 416.0, 2.0, 6.0, 4.0)
    assert back.text_tokens == 40.0 and back.images == 6.0 and back.truncated == 2.0 and back.skipped == 6.0
    assert back.over_budget == 4.0
    with pytest.raises(ValueError, match="expected a vector of 9 counts"):
        StepCounts.from_tensor(vector[:8])


# -- FlopsModel -------------------------------------------------------------------------------------------


def test_flops_with_everything_trainable_counts_six_per_parameter_and_attention_three_times():
    model = tiny()  # TINY_MODEL trains its encoder
    flops = FlopsModel(model)
    n_enc, n_conn, n_dec = numel(model.encoder), numel(model.connector), decoder_params(model)
    assert flops.params == {
        "encoder": (n_enc, 0),
        "pooler": (0, 0),
        "connector": (n_conn, 0),
        "decoder": (n_dec, 0),
    }
    assert all(flops.per_param(part) == (6, 4) for part in PARTS)
    tokens, sum_sq, images = 120.0, 2000.0, 3.0
    expected = (
        images * ENC_TOKENS * 6 * n_enc
        + images * POOLED * 6 * n_conn
        + tokens * 6 * n_dec
        + 3 * 4 * D_ATTN * sum_sq
    )
    assert flops.step(tokens, sum_sq, images) == pytest.approx(expected, rel=1e-12)
    assert flops.step_counts(StepCounts(text_tokens=tokens, sum_sq_lengths=sum_sq, images=images)) == (
        flops.step(tokens, sum_sq, images)
    )


def test_flops_of_frozen_parts_upstream_of_the_first_trainable_one_count_forward_only():
    model = tiny()
    select_trainable(model, ["decoder.*"])  # encoder and connector frozen: nothing needs their gradients
    flops = FlopsModel(model)
    n_enc, n_conn, n_dec = numel(model.encoder), numel(model.connector), decoder_params(model)
    assert flops.per_param("encoder") == (6, 2) and flops.per_param("connector") == (6, 2)
    tokens, sum_sq, images = 50.0, 700.0, 2.0
    expected = images * ENC_TOKENS * 2 * n_enc + images * POOLED * 2 * n_conn + tokens * 6 * n_dec
    assert flops.step(tokens, sum_sq, images) == pytest.approx(expected + 3 * 4 * D_ATTN * sum_sq, rel=1e-12)


def test_flops_pool_after_connector_runs_the_connector_on_every_patch():
    before, after = tiny(), tiny(pool_after_connector=True)
    after.load_state_dict(before.state_dict())
    f_before, f_after = FlopsModel(before), FlopsModel(after)
    assert (f_before.connector_tokens, f_after.connector_tokens) == (POOLED, ENC_TOKENS)
    images = 5.0
    extra = images * (ENC_TOKENS - POOLED) * 6 * numel(after.connector)
    assert f_after.step(80.0, 900.0, images) - f_before.step(80.0, 900.0, images) == pytest.approx(extra)


def test_flops_tied_embeddings_count_the_shared_matrix_once_as_the_head():
    untied = tiny()
    tied = tiny(decoder={**TINY_MODEL["decoder"], "tie_embeddings": True})
    head = untied.decoder.lm_head.weight.numel()
    assert count_params(untied)[0] - count_params(tied)[0] == head  # the tied model has one matrix fewer
    # ... but runs the same matmuls: the head counts, the embedding lookup never does
    assert (
        FlopsModel(tied).params["decoder"]
        == FlopsModel(untied).params["decoder"]
        == (
            decoder_params(untied),
            0,
        )
    )


def test_flops_are_counted_once_through_activation_checkpoint_wrappers():
    from toolkit.strategies import apply_activation_checkpointing

    model = tiny()
    plain = FlopsModel(model)
    assert apply_activation_checkpointing(model) > 0
    wrapped = FlopsModel(model)  # wrappers forward attribute lookups to the module they wrap
    assert len(wrapped.sequence_costs) == 1
    assert wrapped.step(64.0, 512.0, 2.0) == plain.step(64.0, 512.0, 2.0)


class AffineMixer(nn.Module):
    """A plugin mixer whose sequence cost is affine in the length: 100 + 2 L FLOPs per token."""

    def __init__(self, d_model: int, *, layer_idx: int = 0) -> None:
        super().__init__()
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: Tensor, state=None) -> Tensor:
        return self.proj(x)

    def allocate_cache(self, batch_size: int, max_len: int, *, device=None, dtype=None):
        return None

    def flops_per_token(self, seq_len: float) -> float:
        return 100.0 + 2.0 * seq_len


@pytest.fixture
def plugin_mixer():
    registry.discover()
    registry.register("mixer", "_perf_affine", symbol="w")(AffineMixer)
    yield "w"
    registry._REGISTRY["mixer"].pop("_perf_affine")


def test_flops_count_a_plugin_mixers_own_sequence_cost(plugin_mixer):
    decoder = {**TINY_MODEL["decoder"], "n_layers": None, "pattern": f"*-{plugin_mixer}-{plugin_mixer}-"}
    model = tiny(decoder=decoder)
    flops = FlopsModel(model)
    assert len(flops.sequence_costs) == 3  # the attention and both plugin layers
    lengths = [10.0, 30.0, 7.0]  # three text-only samples of one step
    tokens, sum_sq = sum(lengths), sum(L * L for L in lengths)
    per_sample = sum(L * (4 * D_ATTN * L + 2 * (100 + 2 * L)) for L in lengths)  # forward, exact
    expected = 6 * tokens * decoder_params(model) + 3 * per_sample
    assert flops.step(tokens, sum_sq, 0.0) == pytest.approx(expected, rel=1e-12)
    no_attention = tiny(decoder={**decoder, "pattern": f"{plugin_mixer}-{plugin_mixer}-"})
    expected = 6 * tokens * decoder_params(no_attention) + 3 * 2 * (100 * tokens + 2 * sum_sq)
    assert FlopsModel(no_attention).step(tokens, sum_sq, 0.0) == pytest.approx(expected, rel=1e-12)


# -- PerfMonitor under a Trainer ---------------------------------------------------------------------------


class Recorder(Logger):
    """Keeps every ``log_metrics`` call: (step, metrics)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    name = "recorder"
    version = 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append((step, dict(metrics)))

    def series(self, key: str) -> dict[int, float]:
        return {step: m[key] for step, m in self.rows if key in m}


def make_batch(rows: list[tuple[int, int]], seed: int) -> dict[str, Tensor]:
    """rows: (images, text tokens) per sample -> a right-padded batch whose last 3 tokens are targets."""
    g = torch.Generator().manual_seed(seed)
    seqs = [[1] + [IMG] * POOLED * n + torch.randint(6, VOCAB, (t,), generator=g).tolist() for n, t in rows]
    T = max(map(len, seqs))
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    labels = torch.full_like(ids, -100)
    for i, s in enumerate(seqs):
        labels[i, len(s) - 3 : len(s)] = ids[i, len(s) - 3 : len(s)]
    n_images = sum(n for n, _ in rows)
    images = torch.rand(n_images, 3, 16, 16, generator=g) if n_images else None
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "images": images}


class FakeCheckpoint(ModelCheckpoint):
    """Stands in for a slow checkpoint write: moves the monitor's clock 100 s forward, saves nothing."""

    def __init__(self, clock: SimpleNamespace, **kwargs) -> None:
        super().__init__(**kwargs)
        self.clock, self.saved_at = clock, 0

    def on_train_batch_end(self, trainer, *args, **kwargs) -> None:
        if trainer.global_step != self.saved_at:  # at the end of an optimizer step, as ModelCheckpoint
            self.saved_at = trainer.global_step
            self.clock.offset += 100.0

    def on_validation_end(self, *args, **kwargs) -> None:
        pass

    def on_train_epoch_end(self, *args, **kwargs) -> None:
        pass


class SlowValidation(pl.Callback):
    def __init__(self, clock: SimpleNamespace) -> None:
        self.clock = clock

    def on_validation_start(self, *args) -> None:
        self.clock.offset += 1000.0


def test_perf_monitor_logs_each_steps_counts_flops_and_mfu_beside_train_loss(tmp_path, monkeypatch):
    """Two optimizer steps of two micro-batches each; every number is checked against the batches, and
    time spent in checkpoint writes and validation (100 s and 1000 s on the monitor's clock) is excluded."""
    clock = SimpleNamespace(offset=0.0)
    monkeypatch.setattr(
        perf, "time", SimpleNamespace(perf_counter=lambda: time.perf_counter() + clock.offset)
    )
    model = tiny()
    reference = FlopsModel(tiny())  # same architecture and trainable set, built independently
    batches = [
        make_batch([(1, 5), (0, 9)], seed=0),
        make_batch([(2, 4)], seed=1),
        make_batch([(1, 12), (1, 3), (0, 6)], seed=2),
        make_batch([(0, 7)], seed=3),
    ]
    module = ChimeraModule(model, optim={"lr": 1e-3}, max_steps=2, config={"perf": {"peak_tflops": 2e-6}})
    recorder = Recorder()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=2,
        accumulate_grad_batches=2,
        logger=recorder,
        log_every_n_steps=1,
        callbacks=[FakeCheckpoint(clock, dirpath=tmp_path), SlowValidation(clock)],
        val_check_interval=2,  # validation after the first optimizer step
        limit_val_batches=1,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(batches, batch_size=None), DataLoader(batches[:1], batch_size=None))
    assert isinstance(trainer.callbacks[-1], PerfMonitor)  # behind the checkpoint callbacks
    assert sorted(recorder.series("train/loss")) == [0, 1]
    metric_names = (
        "step_time_s",
        "tokens_per_s",
        "samples_per_s",
        "images_per_s",
        "tflops",
        "mfu",
        "peak_mem_gb",
    )
    for name in metric_names:
        assert sorted(recorder.series(f"perf/{name}")) == [0, 1], name  # the steps train/loss is logged at
    for step, micro in enumerate((batches[0:2], batches[2:4])):
        m = {key: recorder.series(key)[step] for key in (f"perf/{n}" for n in metric_names)}
        dt = m["perf/step_time_s"]
        assert 0 < dt < 100, "a checkpoint write or validation counted as step time"
        lengths = torch.cat([b["attention_mask"].sum(1) for b in micro]).double()
        images = sum(0 if b["images"] is None else b["images"].shape[0] for b in micro)
        assert m["perf/tokens_per_s"] * dt == pytest.approx(float(lengths.sum()))
        assert m["perf/samples_per_s"] * dt == pytest.approx(len(lengths))
        assert m["perf/images_per_s"] * dt == pytest.approx(images)
        expected = reference.step(float(lengths.sum()), float(lengths.square().sum()), images)
        assert m["perf/tflops"] * 1e12 * dt == pytest.approx(expected)
        assert m["perf/mfu"] == pytest.approx(m["perf/tflops"] / 2e-6)
        assert m["perf/peak_mem_gb"] > 0


def test_perf_is_logged_every_n_steps_and_at_the_last_step():
    model = tiny()
    module = ChimeraModule(model, optim={"lr": 1e-3}, max_steps=3)
    recorder = Recorder()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=3,
        logger=recorder,
        log_every_n_steps=2,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    batches = [make_batch([(1, 4)], seed=s) for s in range(3)]
    trainer.fit(module, DataLoader(batches, batch_size=None))
    steps = recorder.series("perf/step_time_s")
    assert sorted(steps) == [1, 2]  # global step 2 (every 2), and 3 (the last)
    assert recorder.series("perf/mfu") == {}  # a CPU and no perf.peak_tflops: no MFU
    assert 1 in recorder.series("train/loss")
