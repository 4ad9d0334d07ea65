"""Mid-epoch resume keeps the exact data order for the scenes suite (the sampler and loader are generic)."""

from __future__ import annotations

import torch

from components.datasets.scenes import Scenes
from toolkit.data.datamodule import ChimeraDataModule
from toolkit.data.tokenizer import build_word_tokenizer


def test_scenes_order_after_a_resume_equals_the_uninterrupted_order():
    tok = build_word_tokenizer(Scenes.vocabulary())
    node = {"name": "scenes", "task": "retrieval", "images_per_sample": 3, "size": 24}

    def loader():
        dm = ChimeraDataModule(node, tokenizer=tok, image_tokens=2, image_size=16, batch_size=4, seed=7)
        return dm.train_dataloader()

    def batches(dl):
        return [(b["input_ids"], b["images"]) for b in dl]

    uninterrupted = loader()
    uninterrupted.sampler.set_epoch(2)
    full = batches(uninterrupted)
    assert len(full) == 6
    it = iter(uninterrupted)
    for _ in range(4):
        next(it)
    state = uninterrupted.state_dict()
    assert state == {"epoch": 2, "batches": 4}

    resumed = loader()  # a new process would build it from the same config
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(2)
    rest = batches(resumed)
    assert len(rest) == 2
    for (ids, images), (ids_ref, images_ref) in zip(rest, full[4:]):
        assert torch.equal(ids, ids_ref) and torch.equal(images, images_ref)
    # the next epoch is the uninterrupted run's next epoch too
    resumed.sampler.set_epoch(3)
    uninterrupted.sampler.set_epoch(3)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches(resumed), batches(uninterrupted)))
