"""Training mechanics: token-mean loss under accumulation, resumable data order, atomic checkpoints, crash
and resume (SIGKILL), the staged recipe (trainable sets, weight hand-off, MLflow parent/child runs), perf
accounting and ``chimera bench model``."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import ROOT, TINY_MODEL


@pytest.fixture
def one_thread():
    """Runs compared for equality use one intra-op thread, like the subprocesses they are compared with."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _experiment(tmp_path: Path, **sections) -> dict:
    cfg = {
        "model": TINY_MODEL,
        "data": {
            "train": {"name": "synthetic_shapes", "size": 64, "tasks": ["color", "caption"]},
            "val": None,
            "batch_size": 8,
            "max_length": 48,
        },
        "optim": {"lr": 3e-3},
        "trainer": {
            "max_steps": 12,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "accelerator": "cpu",
        },
        "checkpoint": {"every_n_steps": 5},
        "output_dir": str(tmp_path / "runs"),
        "tracking": {"experiment": "training"},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


def _tokenizer():
    from components.datasets.synthetic_shapes import SyntheticShapes
    from toolkit.data.tokenizer import build_word_tokenizer

    return build_word_tokenizer(SyntheticShapes.vocabulary())


def _history(uri: str, run_id: str, key: str = "train/loss") -> dict[int, float]:
    from mlflow import MlflowClient

    return {m.step: m.value for m in MlflowClient(uri).get_metric_history(run_id, key)}


# -- loss normalisation ------------------------------------------------------------------------------------


def test_accumulated_micro_batches_give_the_big_batch_token_mean_gradient():
    """accumulate_grad_batches=2 over micro-batches of different lengths and target-token counts == one big
    batch normalised by its target tokens (gradient read after the module's rescale, before clipping)."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from components.datasets.synthetic_shapes import SyntheticShapes
    from toolkit.data.collate import Collator
    from toolkit.data.tokenizer import image_token_id
    from toolkit.model import build_model
    from toolkit.module import ChimeraModule, token_losses

    tok = _tokenizer()
    model = build_model(TINY_MODEL, vocab_size=len(tok), image_token_id=image_token_id(tok))
    initial = copy.deepcopy(model.state_dict())
    single = SyntheticShapes(size=4, image_size=16, tasks=["color"])  # 1-word answers
    double = SyntheticShapes(
        size=2, image_size=16, tasks=["caption"], images_per_sample=2
    )  # 2 images, 6 words
    collate = Collator(tok, model.image_tokens, 64)
    short, long = [single[0], single[1], single[2]], [double[0]]
    a, b = collate(short), collate(long)
    assert a["input_ids"].shape[1] != b["input_ids"].shape[1]
    assert int((a["labels"][:, 1:] != -100).sum()) != int((b["labels"][:, 1:] != -100).sum())

    class Grab(ChimeraModule):
        def on_before_optimizer_step(self, optimizer):
            super().on_before_optimizer_step(optimizer)
            self.grads = {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None}

    module = Grab(model, optim={"lr": 1e-3}, max_steps=1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=1,
        accumulate_grad_batches=2,
        gradient_clip_val=None,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=DataLoader([a, b], batch_size=None))

    def grads_of(loss_fn):
        ref = build_model(TINY_MODEL, vocab_size=len(tok), image_token_id=image_token_id(tok))
        ref.load_state_dict(initial)
        loss_fn(ref).backward()
        return {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}

    def token_mean(ref, batch):
        loss_sum, n, _ = token_losses(ref(batch["input_ids"], batch["images"]), batch["labels"])
        return loss_sum / n

    big = collate(short + long)
    expected = grads_of(lambda ref: token_mean(ref, big))
    naive = grads_of(lambda ref: 0.5 * (token_mean(ref, a) + token_mean(ref, b)))  # mean of micro-batch means
    assert set(module.grads) == set(expected)

    def rel_error(grads):  # per parameter tensor: |g - g_ref| / |g_ref|, worst over the model
        return max(float((grads[n] - g).norm() / g.norm()) for n, g in expected.items() if g.norm() > 0)

    print(
        f"accumulated vs big batch: {rel_error(module.grads):.2e}; mean of means vs big batch: {rel_error(naive):.2e}"
    )
    assert rel_error(module.grads) < 1e-4  # fp32, other padding: ~1e-6
    assert rel_error(naive) > 0.05  # what a per-micro-batch mean would give: the test can fail


# -- resumable data order -----------------------------------------------------------------------------------


def test_train_loader_resumes_mid_epoch_after_the_last_trained_batch():
    from toolkit.data.datamodule import ChimeraDataModule, ResumableDataLoader

    tok = _tokenizer()

    def loader():
        dm = ChimeraDataModule(
            {"name": "synthetic_shapes", "size": 40},
            tokenizer=tok,
            image_tokens=4,
            image_size=16,
            batch_size=4,
        )
        return dm.train_dataloader()

    first = loader()
    assert isinstance(first, ResumableDataLoader) and len(first) == 10
    first.sampler.set_epoch(1)
    full = [b["input_ids"] for b in first]
    it = iter(first)
    for _ in range(3):
        next(it)
    state = first.state_dict()
    assert state == {"epoch": 1, "batches": 3}

    resumed = loader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(
        1
    )  # Lightning sets the epoch after load_state_dict and iter(): both orders work
    rest = [b["input_ids"] for b in resumed]
    assert len(rest) == 7 and all(torch.equal(x, y) for x, y in zip(rest, full[3:]))
    assert resumed.state_dict() == {"epoch": 1, "batches": 10}
    again = [b["input_ids"] for b in resumed]  # the skip applies once
    assert len(again) == 10

    other_epoch = loader()
    other_epoch.load_state_dict(state)
    other_epoch.sampler.set_epoch(2)  # the saved epoch had ended: a new epoch starts from its first batch
    assert len(list(other_epoch)) == 10


# -- checkpoint files -------------------------------------------------------------------------------------


def test_latest_checkpoint_never_returns_partial_or_incomplete_ones(tmp_path):
    from toolkit.checkpointing import latest_checkpoint
    from toolkit.strategies import AtomicCheckpointIO

    ckpt = tmp_path / "checkpoints"
    AtomicCheckpointIO().save_checkpoint({"global_step": 2}, ckpt / "step000002.ckpt")
    assert [p.name for p in ckpt.iterdir()] == ["step000002.ckpt"]  # no temporary file left behind
    sharded = ckpt / "step000004.ckpt"  # a DCP directory whose writer died before the metadata
    sharded.mkdir()
    (sharded / "__0_0.distcp").write_bytes(b"x")
    (ckpt / ".last.ckpt.partial").mkdir()  # FSDP2Strategy's in-progress name
    (ckpt / ".step000006.ckpt.tmp-1-abc").write_bytes(b"x")  # AtomicCheckpointIO's in-progress name
    assert Path(latest_checkpoint(ckpt)).name == "step000002.ckpt"
    (sharded / ".metadata").write_bytes(b"x")
    (sharded / "meta.pt").write_bytes(b"x")
    assert Path(latest_checkpoint(ckpt)).name == "step000004.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 3}, ckpt / "last.ckpt")
    assert Path(latest_checkpoint(ckpt)).name == "last.ckpt"
    assert latest_checkpoint(tmp_path / "missing") is None


def test_fsdp2_sharded_save_replaces_the_directory_only_when_complete(tmp_path):
    from toolkit.strategies import replace_dir

    old, new = tmp_path / "last.ckpt", tmp_path / ".last.ckpt.partial"
    old.mkdir()
    (old / "a").write_text("old")
    new.mkdir()
    (new / "a").write_text("new")
    replace_dir(new, old)
    assert (old / "a").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


# -- crash and resume -------------------------------------------------------------------------------------

SLOW_TRAIN = """
import sys, time
from toolkit.module import ChimeraModule
_end = ChimeraModule.on_train_batch_end
def on_train_batch_end(self, *args):
    _end(self, *args)
    time.sleep(0.4)  # widen the window in which the test kills the run; the numbers do not change
ChimeraModule.on_train_batch_end = on_train_batch_end
from toolkit.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_same_loss_in_the_same_mlflow_run(tmp_path, one_thread):
    """64 samples / batch 8 = 8 steps per epoch; checkpoints at steps 5 and 10; the run is killed with
    SIGKILL after step 10's checkpoint (mid-epoch 2), resumed with --resume, and must end where an
    uninterrupted run with the same seed ends."""
    from toolkit.checkpointing import read_state_dict
    from toolkit.train import train

    config = _write(tmp_path / "exp.yaml", _experiment(tmp_path))
    reference = train(config, ["name=reference"])
    ref_losses = _history(reference.tracking_uri, reference.run_id)
    assert len(ref_losses) == 12

    run_dir = tmp_path / "runs" / "crash"
    log = (tmp_path / "crash.log").open("w")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_TRAIN, "train", str(config), "name=crash"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=log,
    )
    last, deadline = run_dir / "checkpoints" / "last.ckpt", time.monotonic() + 300

    def saved_step() -> int:  # last.ckpt is replaced atomically: a load sees a complete file
        return torch.load(last, weights_only=True)["global_step"] if last.exists() else 0

    while saved_step() < 10:  # step 11 starts 0.4 s after step 10's checkpoint
        assert proc.poll() is None, (
            "the run ended before it could be killed: " + (tmp_path / "crash.log").read_text()[-2000:]
        )
        assert time.monotonic() < deadline, "no step-10 checkpoint after 300 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, (tmp_path / "crash.log").read_text()[-3000:]
    state = json.loads((run_dir / "run.json").read_text())
    assert state["finished"] is False and not (run_dir / "final.safetensors").exists()
    assert saved_step() == 10  # mid-epoch: epoch 1, batch 2 of 8

    resumed = train(config, ["name=crash"], resume=True)
    assert resumed.run_id == state["run_id"]  # the same MLflow run continues
    assert resumed.stages[0].global_step == 12
    losses = _history(resumed.tracking_uri, resumed.run_id)
    assert max(losses) == 11 and {0, 1, 2, 3, 4, 10, 11} <= set(losses)  # steps from both processes
    for step, value in losses.items():
        assert value == pytest.approx(ref_losses[step], rel=1e-6, abs=1e-7), step
    final, expected = (
        read_state_dict(resumed.stages[0].checkpoint),
        read_state_dict(reference.stages[0].checkpoint),
    )
    for name, value in expected.items():
        torch.testing.assert_close(final[name], value, rtol=0, atol=1e-6, msg=name)
    from mlflow import MlflowClient

    assert MlflowClient(resumed.tracking_uri).get_run(resumed.run_id).info.status == "FINISHED"
    assert json.loads((run_dir / "run.json").read_text())["finished"] is True


# -- staged recipe ------------------------------------------------------------------------------------------


def _staged(tmp_path: Path) -> Path:
    short = {"max_steps": 2}
    cfg = _experiment(tmp_path, checkpoint={"every_n_steps": 2}, trainer={"max_steps": 2})
    cfg["stages"] = [
        {
            "name": "align",
            "trainable": ["connector.*"],
            "optim": {"lr": 1e-2},
            "data": {"train": {"name": "synthetic_shapes", "size": 32, "tasks": ["caption"]}},
            "trainer": short,
        },
        {
            "name": "instruct",
            "trainable": ["decoder.*"],
            "trainer": short,
        },  # connector frozen: shows the hand-off
        {
            "name": "multi",
            "trainable": ["connector.*", "decoder.*"],
            "trainer": short,
            "data": {
                "train": {
                    "name": "mixture",
                    "weights": [1, 1],
                    "size": 32,
                    "parts": [
                        {"name": "synthetic_shapes", "images_per_sample": 2, "tasks": ["compare"]},
                        {"name": "synthetic_shapes", "tasks": ["color"]},
                    ],
                }
            },
        },
    ]
    return _write(tmp_path / "staged.yaml", cfg)


def _initial_weights(config: Path) -> dict[str, torch.Tensor]:
    """The weights a stage-1 model starts from (the same seed, tokenizer and build as ``fit_one``)."""
    import lightning.pytorch as pl

    from toolkit.assemble import build_parts
    from toolkit.plan import load_plan

    plan = load_plan(config)
    pl.seed_everything(int(plan.cfg.seed), workers=True, verbose=False)
    model, _ = build_parts(plan.stages[0].cfg, plan.tokenizer)
    return model.state_dict()


def _part(weights: dict[str, torch.Tensor], part: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in weights.items() if k.startswith(part + ".")}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_stages_train_their_own_parameters_from_the_previous_stage_under_one_parent_run(tmp_path):
    from mlflow import MlflowClient

    from toolkit.checkpointing import read_state_dict
    from toolkit.train import train

    config = _staged(tmp_path)
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    result = train(config)
    assert [s.name for s in result.stages] == ["align", "instruct", "multi"]
    assert (
        os.environ.get("MLFLOW_TRACKING_URI") == env_before
    )  # Lightning's logger sets it; fit_one restores it
    init = _initial_weights(config)
    align, instruct, multi = (read_state_dict(s.checkpoint) for s in result.stages)
    # stage 1: the connector only
    assert not _same(_part(align, "connector"), _part(init, "connector"))
    assert _same(_part(align, "encoder"), _part(init, "encoder")) and _same(
        _part(align, "decoder"), _part(init, "decoder")
    )
    # stage 2 starts from stage 1's weights: its frozen connector IS stage 1's trained connector
    assert _same(_part(instruct, "connector"), _part(align, "connector"))
    assert not _same(_part(instruct, "decoder"), _part(align, "decoder"))
    # stage 3 starts from stage 2's and trains connector + decoder; the encoder never trained
    assert not _same(_part(multi, "connector"), _part(instruct, "connector"))
    assert _same(_part(multi, "encoder"), _part(init, "encoder"))

    client = MlflowClient(result.tracking_uri)
    parent = client.get_run(result.run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["multi/train/loss"] > 0
    state = json.loads((Path(result.run_dir) / "run.json").read_text())
    assert state["parent_run_id"] == result.run_id and state["finished"] is True
    n_connector = sum(v.numel() for v in _part(init, "connector").values())
    for i, stage in enumerate(result.stages):
        run = client.get_run(stage.run_id)
        assert run.data.tags["mlflow.parentRunId"] == result.run_id
        assert run.data.tags["chimera.stage"] == stage.name and run.info.status == "FINISHED"
        assert state["stages"][stage.name] == {
            "run_id": stage.run_id,
            "finished": True,
            "weights": stage.checkpoint,
        }
        if i == 0:
            assert run.data.params["trainable_params"] == str(n_connector)

    # one stage again: a new child run under the same parent, from align's recorded weights; later stages
    # are invalidated, and --resume then runs exactly those
    again = train(config, stage="instruct")
    assert [s.name for s in again.stages] == ["instruct"] and again.run_id == result.run_id
    assert again.stages[0].run_id != result.stages[1].run_id
    assert _same(_part(read_state_dict(again.stages[0].checkpoint), "connector"), _part(align, "connector"))
    state = json.loads((Path(result.run_dir) / "run.json").read_text())
    assert state["stages"]["multi"] == {} and state["finished"] is False
    rest = train(config, resume=True)
    assert [s.name for s in rest.stages] == ["multi"] and rest.run_id == result.run_id

    # a stage that died after its run existed: --resume continues that MLflow run from its checkpoint
    state_file = Path(result.run_dir) / "run.json"
    state = json.loads(state_file.read_text())
    state["stages"]["multi"]["finished"] = False
    state_file.write_text(json.dumps(state))
    continued = train(config, resume=True)
    assert [s.name for s in continued.stages] == ["multi"]
    assert continued.stages[0].run_id == rest.stages[0].run_id and continued.stages[0].global_step == 2
    assert (
        len(_history(result.tracking_uri, continued.stages[0].run_id)) == 2
    )  # resumed at its end: no re-run


def test_stage_order_is_enforced_and_stage_configs_are_checked_up_front(tmp_path):
    from toolkit.errors import ChimeraError
    from toolkit.train import train

    config = _staged(tmp_path)
    with pytest.raises(
        ChimeraError, match="stage 'instruct' starts from stage 'align', which has not finished"
    ):
        train(config, stage="instruct")
    with pytest.raises(ChimeraError, match="no such stage"):
        train(config, stage="nope")
    cfg = yaml.safe_load(config.read_text())
    cfg["stages"][2]["data"]["train"]["parts"][1]["sise"] = 3
    with pytest.raises(ChimeraError, match=r"stages\[2\] \(multi\).*parts\[1\]\.sise: unknown argument"):
        train(_write(tmp_path / "bad.yaml", cfg))


def test_longllava_recipe_is_a_valid_three_stage_config():
    from omegaconf import OmegaConf

    from toolkit.plan import load_plan

    path = ROOT / "experiments" / "longllava" / "recipe.yaml"
    plan = load_plan(path)
    cfg, stages = plan.cfg, [s.cfg for s in plan.stages]
    assert [s["name"] for s in cfg.stages] == ["align", "instruct", "multi_image"]
    assert list(stages[0].optim.trainable) == ["connector.*"]
    assert list(stages[1].optim.trainable) == ["connector.*", "decoder.*"]
    multi = OmegaConf.to_container(stages[2].data.train)
    assert multi["name"] == "mixture" and multi["parts"][0]["images_per_sample"] == 2
    assert multi["parts"][0]["radius"] == list(cfg.data.train.radius)  # interpolated from the quick start
    assert "second" in plan.tokenizer.get_vocab()  # the compare task's answers are in the vocabulary


# -- mixture dataset ------------------------------------------------------------------------------------------


def test_mixture_is_weighted_deterministic_and_knows_its_vocabulary():
    from toolkit import registry
    from toolkit.data.datamodule import dataset_vocabulary

    node = {
        "name": "mixture",
        "weights": [3, 1],
        "size": 40,
        "parts": [
            {"name": "synthetic_shapes", "size": 8, "images_per_sample": 2, "tasks": ["compare"]},
            {"name": "synthetic_shapes", "size": 100, "tasks": ["color"]},
        ],
    }
    mix = registry.build("dataset", node, "data.train", image_size=16)
    again = registry.build("dataset", node, "data.train", image_size=16)
    assert len(mix) == 40 and mix.counts == [30, 10]
    samples = [mix[i] for i in range(40)]
    assert sum(s["images"].shape[0] == 2 for s in samples) == 30
    assert all(s["id"] == t["id"] for s, t in zip(samples, (again[i] for i in range(40))))
    assert samples[0]["images"].shape[-1] == 16  # image_size reached the parts
    assert {s["id"] for s in samples if s["images"].shape[0] == 2} == {
        f"synthetic_shapes-train-0-{i}" for i in range(8)
    }
    assert "second" in dataset_vocabulary(node)  # the compare part's answers


# -- perf accounting ------------------------------------------------------------------------------------------


def test_flops_model_counts_frozen_parts_by_whether_gradients_flow_through_them():
    from toolkit.data.tokenizer import image_token_id
    from toolkit.model import build_model
    from toolkit.module import select_trainable
    from toolkit.perf import FlopsModel

    tok = _tokenizer()
    model = build_model(TINY_MODEL, vocab_size=len(tok), image_token_id=image_token_id(tok))
    select_trainable(model, ["connector.*"])
    flops = FlopsModel(model)
    n_enc, n_conn = (
        sum(p.numel() for p in model.encoder.parameters()),
        sum(p.numel() for p in model.connector.parameters()),
    )
    n_dec = sum(p.numel() for p in model.decoder.parameters()) - model.decoder.embed_tokens.weight.numel()
    assert flops.params["connector"] == (n_conn, 0) and flops.params["decoder"] == (0, n_dec)
    assert flops.per_param("encoder") == (6, 2) and flops.per_param("decoder") == (6, 4)
    d_attn = 32  # one attention layer (hybrid_1_1 over 2 layers), 2 heads x 16
    assert [cost(10.0) for cost in flops.sequence_costs] == [4 * d_attn * 10.0]
    tokens, sum_sq, images = 100.0, 1000.0, 4.0
    expected = (
        images * model.encoder.num_tokens * 2 * n_enc
        + images * model.pooler.num_tokens * 6 * n_conn
        + tokens * 4 * n_dec
        + 3 * 4 * d_attn * sum_sq
    )
    assert flops.step(tokens, sum_sq, images) == pytest.approx(expected)


@pytest.mark.slow
def test_bench_model_times_both_loops_in_one_run(tiny_experiment, capsys):
    from toolkit.cli import main

    assert main(["bench", "model", str(tiny_experiment), "--steps", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    import statistics

    # the summary is the median of the raw per-step times both loops recorded, side by side
    lightning, plain = result["lightning_step_s_all"], result["plain_step_s_all"]
    assert all(t > 0 for t in lightning + plain)
    assert result["overhead_ratio"] == pytest.approx(statistics.median(lightning) / statistics.median(plain))
    assert len(result["plain_step_s_all"]) == len(result["lightning_step_s_all"]) == result["steps"] == 2
    assert result["paired_ratio_median"] > 0
    assert result["command"].startswith("chimera bench model")
