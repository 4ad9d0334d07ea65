"""SeededSampler sharding and epochs, dataset_vocabulary, and the datamodule's loaders and batches."""

from __future__ import annotations

import pytest
import torch

from components.datasets.synthetic_shapes import SyntheticShapes
from toolkit import registry
from toolkit.data.datamodule import ChimeraDataModule, SeededSampler, dataset_vocabulary
from toolkit.data.tokenizer import build_word_tokenizer, image_token_id
from toolkit.errors import ChimeraError


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer(SyntheticShapes.vocabulary())


# -- SeededSampler ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [10, 11])
def test_two_ranks_get_disjoint_shards_of_one_permutation(n):
    whole = list(SeededSampler(n, seed=3, rank=0, num_replicas=1))
    assert sorted(whole) == list(range(n)) and whole != list(range(n))
    shards = [list(SeededSampler(n, seed=3, rank=r, num_replicas=2)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == n // 2 == len(SeededSampler(n, seed=3, rank=1, num_replicas=2))
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(
        whole[: 2 * (n // 2)]
    )  # the same permutation, tail dropped
    assert shards[0] == whole[0 : 2 * (n // 2) : 2] and shards[1] == whole[1 : 2 * (n // 2) : 2]


def test_epoch_and_seed_change_the_order():
    sampler = SeededSampler(50, seed=0, rank=0, num_replicas=1)
    first = list(sampler)
    assert list(sampler) == first  # same epoch, same order
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first and sorted(second) == sorted(first)
    sampler.set_epoch(0)
    assert list(sampler) == first
    assert list(SeededSampler(50, seed=1, rank=0, num_replicas=1)) != first


def test_unshuffled_without_drop_pads_every_rank_equally():
    shards = [list(SeededSampler(5, shuffle=False, drop_last=False, rank=r, num_replicas=2)) for r in (0, 1)]
    assert shards == [[0, 2, 4], [1, 3, 0]]
    assert list(SeededSampler(5, shuffle=False, drop_last=False)) == [0, 1, 2, 3, 4]
    assert list(SeededSampler(2, shuffle=False, drop_last=False, rank=3, num_replicas=4)) == [1]


def test_rank_and_world_size_come_from_torch_distributed(monkeypatch):
    import toolkit.data.datamodule as dm_module

    explicit = [list(SeededSampler(9, seed=5, rank=r, num_replicas=3)) for r in range(3)]
    monkeypatch.setattr(dm_module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dm_module.dist, "get_world_size", lambda: 3)
    for r in range(3):
        monkeypatch.setattr(dm_module.dist, "get_rank", lambda r=r: r)
        sampler = SeededSampler(9, seed=5)
        assert (sampler.rank, sampler.num_replicas, len(sampler)) == (r, 3, 3)
        assert list(sampler) == explicit[r]


def test_sampler_rejects_bad_rank():
    with pytest.raises(ValueError, match="rank"):
        SeededSampler(10, rank=2, num_replicas=2)


# -- dataset_vocabulary ------------------------------------------------------------------------------------


def test_dataset_vocabulary(monkeypatch):
    assert dataset_vocabulary({"name": "synthetic_shapes", "size": 5}) == SyntheticShapes.vocabulary()
    assert dataset_vocabulary("synthetic_shapes") == SyntheticShapes.vocabulary()
    with pytest.raises(ChimeraError, match="data.val: unknown dataset 'synthetic_shape'.*did you mean"):
        dataset_vocabulary({"name": "synthetic_shape"}, where="data.val")

    class NoVocab(torch.utils.data.Dataset):
        """A dataset without a built-in vocabulary."""

    registry.discover()
    monkeypatch.setitem(
        registry._REGISTRY["dataset"], "no_vocab", registry.Entry("dataset", "no_vocab", NoVocab)
    )
    with pytest.raises(
        ChimeraError, match="data.train: dataset 'no_vocab' has no built-in vocabulary.*data.tokenizer"
    ):
        dataset_vocabulary({"name": "no_vocab"})


# -- ChimeraDataModule -------------------------------------------------------------------------------------


def make(tok, **kwargs):
    defaults = dict(
        train={"name": "synthetic_shapes", "size": 40, "tasks": ["color", "caption"]},
        val={"name": "synthetic_shapes", "size": 10, "split": "val"},
        tokenizer=tok,
        image_tokens=4,
        image_size=16,
        batch_size=8,
        seed=0,
    )
    defaults.update(kwargs)
    train, val = defaults.pop("train"), defaults.pop("val")
    return ChimeraDataModule(train, val, **defaults)


def test_train_loader_batch_has_the_documented_shapes(tok):
    dm = make(tok)
    assert dm.tokenizer is tok
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, SeededSampler) and loader.sampler.shuffle and loader.drop_last
    assert len(loader) == 40 // 8 and not loader.persistent_workers
    batch = next(iter(loader))
    B, T = batch["input_ids"].shape
    assert B == 8
    assert batch["labels"].shape == batch["attention_mask"].shape == (B, T)
    assert batch["images"].shape == (8, 3, 16, 16) and batch["images"].dtype == torch.float32
    assert int((batch["input_ids"] == image_token_id(tok)).sum()) == 8 * 4
    assert int((batch["labels"] != -100).sum()) >= 2 * B  # every answer and its </s>
    assert batch["n_truncated"].ndim == 0 and int(batch["n_truncated"]) == 0
    assert dm.train_dataset.image_size == 16 and dm.train_dataset.seed == 0


def test_template_is_built_once_and_reaches_the_collator(tok):
    from omegaconf import OmegaConf

    default = make(tok)
    assert default.template.name == "vicuna_v1"
    tok3 = build_word_tokenizer(SyntheticShapes.vocabulary(), template="chatml")
    dm = make(tok3, template=OmegaConf.create({"name": "chatml", "system": None}))
    assert dm.template.name == "chatml" and dm.template.system is None
    loader = dm.train_dataloader()
    assert loader.collate_fn.template is dm.template
    ids = next(iter(loader))["input_ids"][0].tolist()
    assert tok3.convert_ids_to_tokens(ids[:2]) == ["<|im_start|>", "user"]
    with pytest.raises(
        ChimeraError, match="data.template.name: unknown template 'chatlm'.*did you mean 'chatml'"
    ):
        make(tok, template={"name": "chatlm"})
    with pytest.raises(ChimeraError, match="data.template.sistem: unknown argument"):
        make(tok, template={"name": "chatml", "sistem": "x"})


def test_truncated_samples_are_counted_per_batch(tok):
    loader = make(tok, max_length=10).val_dataloader()  # every prompt is longer than 10 tokens
    assert [int(b["n_truncated"]) for b in loader] == [8, 2]


def test_train_order_follows_seed_and_epoch(tok):
    def first_batch(dm, epoch=0):
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return next(iter(loader))["input_ids"]

    a, b = make(tok), make(tok)
    assert torch.equal(first_batch(a), first_batch(b))
    assert not torch.equal(first_batch(a), first_batch(a, epoch=1))
    assert not torch.equal(first_batch(a), first_batch(make(tok, seed=1)))


def test_val_loader_is_ordered_and_keeps_every_sample(tok):
    dm = make(tok, val_batch_size=4)
    loader = dm.val_dataloader()
    assert not loader.sampler.shuffle and not loader.drop_last
    assert list(loader.sampler) == list(range(10))
    sizes = [b["input_ids"].shape[0] for b in loader]
    assert sizes == [4, 4, 2]
    assert make(tok, val=None).val_dataloader() == []


def test_workers_are_persistent(tok):
    loader = make(tok, num_workers=2).train_dataloader()
    assert loader.num_workers == 2 and loader.persistent_workers


def test_config_errors_fail_at_construction(tok):
    with pytest.raises(ChimeraError, match="data.train.image_size: is derived"):
        make(tok, train={"name": "synthetic_shapes", "image_size": 16})
    with pytest.raises(ChimeraError, match="data.val.sise: unknown argument.*did you mean 'size'"):
        make(tok, val={"name": "synthetic_shapes", "sise": 3})
    with pytest.raises(ChimeraError, match="data.train: 6 samples over 1 rank\\(s\\) give no full batch"):
        make(tok, train={"name": "synthetic_shapes", "size": 6}).train_dataloader()


def test_lightning_calls_set_epoch_and_keeps_the_sampler(tok, tmp_path):
    import lightning as L

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(len(tok), 2)
            self.first = []

        def training_step(self, batch, batch_idx):
            if batch_idx == 0:
                self.first.append(batch["input_ids"].clone())
            return self.emb(batch["input_ids"]).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm, probe = make(tok, val=None), Probe()
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(probe, dm)
    assert isinstance(trainer.train_dataloader.sampler, SeededSampler)
    assert trainer.train_dataloader.sampler.epoch == 1
    assert len(probe.first) == 2 and not torch.equal(probe.first[0], probe.first[1])
