"""Checkpoint safety and recovery: weights-only loading (a planted malicious pickle never runs), the
safetensors export, falling back from a damaged ``last.ckpt`` on resume, and removing what a killed writer
left behind."""

from __future__ import annotations

import os
import pickle
import shlex
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from toolkit.checkpointing import (
    FINAL_WEIGHTS,
    checkpoint_problem,
    clean_stale_temporaries,
    export_weights,
    final_weights,
    latest_checkpoint,
    load_weights,
    loadable_checkpoint,
    read_dcp_metadata,
    read_state_dict,
    safe_torch_load,
)
from toolkit.errors import ChimeraError


class Payload:
    """What an attacker plants: unpickling it runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def _plant(path: Path, marker: Path, *, as_torch: bool) -> Path:
    """A checkpoint-shaped file whose unpickling would run ``Payload``; proves the payload is live."""
    obj = {"state_dict": {"weight": torch.ones(2)}, "epoch": Payload(marker)}
    if as_torch:
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj))
    raw = pickle.dumps(obj)
    pickle.loads(raw)  # an unsafe load runs the command: the test would notice one
    assert marker.exists()
    marker.unlink()
    return path


# -- a real Lightning checkpoint --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory) -> Path:
    """A Lightning run with checkpoints at steps 2 and 4 plus last.ckpt: loop, callback, optimizer,
    scheduler and hyper-parameter state, as a real run writes them."""
    root = tmp_path_factory.mktemp("lightning")
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(16, 4), torch.randn(16, 2)), batch_size=4)
    pl.Trainer(**_trainer_kwargs(root, max_steps=4)).fit(_TinyModule(_CONFIG), data)
    names = sorted(p.name for p in (root / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step000002.ckpt", "step000004.ckpt"], names
    return root


_CONFIG = {"name": "tiny", "optim": {"lr": 1e-2, "betas": [0.9, 0.95]}, "stages": [], "uri": None}


def _trainer_kwargs(root: Path, max_steps: int) -> dict:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from toolkit.strategies import AtomicCheckpointIO

    return {
        "max_steps": max_steps,
        "accelerator": "cpu",
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(root),
        "plugins": [AtomicCheckpointIO()],
        "callbacks": [
            ModelCheckpoint(
                dirpath=str(root / "checkpoints"),
                filename="step{step:06d}",
                auto_insert_metric_name=False,
                every_n_train_steps=2,
                save_top_k=-1,
                save_last=True,
                enable_version_counter=False,
            )
        ],
    }


class _TinyModule(pl.LightningModule):
    def __init__(self, config: dict) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.model(x), y)

    def configure_optimizers(self):
        optim = torch.optim.AdamW(self.parameters(), lr=1e-2, betas=(0.9, 0.95))
        sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda step: 1.0 / (1 + step))
        return {"optimizer": optim, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_lightning_checkpoints_load_weights_only_and_resume(lightning_run, tmp_path):
    last = lightning_run / "checkpoints" / "last.ckpt"
    state = safe_torch_load(last)  # loops, callbacks, optimizer, scheduler, hparams: no extra globals
    assert state["global_step"] == 4 and state["optimizer_states"] and state["lr_schedulers"]
    assert state["hyper_parameters"]["config"] == _CONFIG
    weights = read_state_dict(last)
    assert sorted(weights) == ["bias", "weight"]  # relative to the model ("model." stripped)
    assert checkpoint_problem(last) is None and checkpoint_problem(last, verify=True) is None

    run = tmp_path / "resumed"
    shutil.copytree(lightning_run, run)
    data = DataLoader(TensorDataset(torch.randn(16, 4), torch.randn(16, 2)), batch_size=4)
    trainer = pl.Trainer(**_trainer_kwargs(run, max_steps=6))
    trainer.fit(
        _TinyModule(_CONFIG), data, ckpt_path=str(run / "checkpoints" / "last.ckpt"), weights_only=True
    )
    assert trainer.global_step == 6


# -- malicious files --------------------------------------------------------------------------------------


@pytest.mark.parametrize("as_torch", [True, False], ids=["torch.save", "raw-pickle"])
@pytest.mark.parametrize("name", ["checkpoints/last.ckpt", FINAL_WEIGHTS, "final.pt"])
def test_a_planted_malicious_pickle_is_refused_and_never_runs(tmp_path, name, as_torch):
    marker = tmp_path / "PWNED"
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    _plant(path, marker, as_torch=as_torch)

    with pytest.raises(ChimeraError) as err:
        read_state_dict(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ChimeraError, match="refusing|not a safetensors"):
        load_weights(nn.Linear(2, 1), path)
    if name.endswith(".ckpt"):
        assert checkpoint_problem(path) is not None
        assert loadable_checkpoint(path.parent) == (None, [(str(path), checkpoint_problem(path))])
    if as_torch and not name.endswith(".safetensors"):
        with pytest.raises(ChimeraError, match=r"refusing to load.*GLOBAL posix\.system"):
            safe_torch_load(path)
    assert not marker.exists()


def _dcp(root: Path, extra: dict | None = None) -> Path:
    """A DCP directory as FSDP2Strategy writes one (shards + .metadata + Lightning's meta.pt)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    state = {"state_dict": {"model.weight": torch.randn(3, 4), "model.bias": torch.zeros(3)}, **(extra or {})}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(root)), no_dist=True)
    torch.save({"global_step": 4, "loops": {"fit_loop": {}}}, root / "meta.pt")
    return root


def test_sharded_checkpoints_are_read_without_unpickling_code(tmp_path):
    marker = tmp_path / "PWNED"
    good = _dcp(tmp_path / "step000004.ckpt", {"optimizer_states": [{"lr": 0.1, "betas": (0.9, 0.95)}]})
    assert sorted(read_state_dict(good)) == ["bias", "weight"]
    assert checkpoint_problem(good) is None
    assert "state_dict.weight" not in read_dcp_metadata(good).state_dict_metadata  # keys as saved
    assert "state_dict.model.weight" in read_dcp_metadata(good).state_dict_metadata

    bad_metadata = _dcp(tmp_path / "a.ckpt")
    (bad_metadata / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ChimeraError, match=r"\.metadata: refusing to load: .*system"):
        read_state_dict(bad_metadata)
    assert "refusing" in checkpoint_problem(bad_metadata)

    # a non-tensor item DCP's planner would unpickle with weights_only=False on resume
    bad_item = _dcp(tmp_path / "b.ckpt", {"optimizer_states": [{"lr": Payload(marker)}]})
    assert sorted(read_state_dict(bad_item)) == ["bias", "weight"]  # model weights never touch it
    assert "refusing to load item optimizer_states.0.lr" in checkpoint_problem(bad_item)

    bad_meta = _dcp(tmp_path / "c.ckpt")
    torch.save({"loops": Payload(marker)}, bad_meta / "meta.pt")
    assert checkpoint_problem(bad_meta).startswith("meta.pt: refusing to load")
    assert not marker.exists()


# -- export -----------------------------------------------------------------------------------------------


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight  # tied, as decoders tie the LM head
        self.proj = nn.Linear(3, 3)


def test_export_writes_safetensors_that_load_back_with_tied_weights(tmp_path, lightning_run):
    model = _Tied()
    dest = export_weights(model.state_dict(), tmp_path / "run" / FINAL_WEIGHTS)
    assert Path(dest).read_bytes()[8:9] == b"{"  # a safetensors header, not a pickle
    assert final_weights(tmp_path / "run") == dest
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [FINAL_WEIGHTS]  # no temporary left

    other = _Tied()
    load_weights(other, dest)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(other.state_dict()[key], value, rtol=0, atol=0)
    assert other.head.weight is other.embed.weight

    # a Lightning checkpoint exports the same way; an older run's final.pt still loads (weights only)
    from_ckpt = export_weights(lightning_run / "checkpoints" / "last.ckpt", tmp_path / FINAL_WEIGHTS)
    legacy = export_weights(lightning_run / "checkpoints" / "last.ckpt", tmp_path / "old" / "final.pt")
    assert final_weights(tmp_path / "old") == legacy and final_weights(tmp_path / "none") is None
    a, b = read_state_dict(from_ckpt), read_state_dict(legacy)
    assert sorted(a) == sorted(b) == ["bias", "weight"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ChimeraError, match="missing keys"):
        load_weights(_Tied(), from_ckpt)


# -- recovery ---------------------------------------------------------------------------------------------


@pytest.fixture
def ckpt_dir(lightning_run, tmp_path) -> Path:
    target = tmp_path / "checkpoints"
    shutil.copytree(lightning_run / "checkpoints", target)
    return target


def test_a_truncated_last_ckpt_falls_back_to_the_newest_step_checkpoint(ckpt_dir):
    last = ckpt_dir / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])  # what a copy cut short leaves
    assert latest_checkpoint(ckpt_dir) == str(last)  # the cheap lookup cannot tell
    path, skipped = loadable_checkpoint(ckpt_dir)
    assert path == str(ckpt_dir / "step000004.ckpt")
    assert len(skipped) == 1 and skipped[0][0] == str(last)
    assert skipped[0][1].startswith("truncated") and "central directory" in skipped[0][1]
    with pytest.raises(ChimeraError, match=r"last\.ckpt: cannot read this torch file: truncated"):
        read_state_dict(last)


def test_an_empty_last_ckpt_and_a_corrupt_step_checkpoint_are_skipped(ckpt_dir):
    (ckpt_dir / "last.ckpt").write_bytes(b"")
    step4 = ckpt_dir / "step000004.ckpt"
    with zipfile.ZipFile(step4) as archive:  # the first tensor storage's bytes
        member = next(i for i in archive.infolist() if "/data/" in i.filename and i.file_size)
    data = bytearray(step4.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[member.header_offset + 26 : member.header_offset + 30])
    data[member.header_offset + 30 + name_len + extra_len] ^= 0xFF  # a flipped bit: only the CRC sees it
    step4.write_bytes(bytes(data))
    assert checkpoint_problem(step4) is None  # the cheap check does not read tensor data
    path, skipped = loadable_checkpoint(ckpt_dir, verify=True)
    assert path == str(ckpt_dir / "step000002.ckpt")
    assert [(Path(p).name, reason) for p, reason in skipped] == [
        ("last.ckpt", "empty file (0 bytes)"),
        ("step000004.ckpt", f"corrupt: member {member.filename} fails its CRC check"),
    ]
    assert safe_torch_load(ckpt_dir / "step000002.ckpt")["global_step"] == 2


def test_sharded_checkpoints_without_metadata_or_with_a_short_shard_are_skipped(ckpt_dir, tmp_path):
    no_metadata = ckpt_dir / "step000008.ckpt"  # a writer killed before DCP's .metadata
    no_metadata.mkdir()
    (no_metadata / "__0_0.distcp").write_bytes(b"x" * 100)
    short = _dcp(ckpt_dir / "step000006.ckpt")
    shard = short / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-10])
    no_meta_pt = _dcp(tmp_path / "staging")  # a complete DCP whose meta.pt is lost
    (no_meta_pt / "meta.pt").unlink()
    (ckpt_dir / "last.ckpt").unlink()
    no_meta_pt.rename(ckpt_dir / "last.ckpt")

    path, skipped = loadable_checkpoint(ckpt_dir)
    assert path == str(ckpt_dir / "step000004.ckpt")
    assert [(Path(p).name, reason) for p, reason in skipped] == [
        ("last.ckpt", "incomplete distributed checkpoint: no meta.pt"),
        ("step000008.ckpt", "incomplete distributed checkpoint: no .metadata"),
        ("step000006.ckpt", skipped[2][1]),
    ]
    assert skipped[2][1].startswith("truncated shard file __0_0.distcp")
    assert loadable_checkpoint(ckpt_dir / "missing") == (None, [])


def test_stale_temporaries_are_removed_and_everything_else_is_kept(ckpt_dir, tmp_path):
    before = sorted(p.name for p in ckpt_dir.iterdir())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = {
        f".step000006.ckpt.tmp-{dead.pid}-a1b2c3": "file",  # AtomicCheckpointIO's temporary
        f".last.ckpt.tmp-{os.getpid()}-d4e5f6": "file",  # this process is not writing now
        ".last.ckpt.partial": "dir",  # FSDP2Strategy's in-progress directory
        ".step000004.ckpt.old-0123abcd": "dir",  # replace_dir's previous directory
    }
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("x")
    keep = {
        f".final.pt.tmp-{os.getppid()}-abcdef": "file",  # a live writer's file
        ".notes": "file",
        ".cache": "dir",
        "notes.tmp-1-abc": "file",  # not hidden
        ".step000002.ckpt.partial.bak": "file",
        ".x.old-zz": "dir",  # not a hex suffix
    }
    for name, kind in {**stale, **keep}.items():
        if kind == "dir":
            (ckpt_dir / name).mkdir()
            (ckpt_dir / name / "__0_0.distcp").write_bytes(b"x")
        else:
            (ckpt_dir / name).write_bytes(b"x")
    (ckpt_dir / ".link.partial").symlink_to(outside, target_is_directory=True)  # removed, target untouched

    removed = clean_stale_temporaries(ckpt_dir)
    assert sorted(Path(p).name for p in removed) == sorted([*stale, ".link.partial"])
    names = {p.name for p in ckpt_dir.iterdir()}
    assert names == {*keep, *before} and (outside / "keep").exists()
    assert before == ["last.ckpt", "step000002.ckpt", "step000004.ckpt"]
    assert loadable_checkpoint(ckpt_dir) == (str(ckpt_dir / "last.ckpt"), [])
    assert clean_stale_temporaries(tmp_path / "missing") == []
