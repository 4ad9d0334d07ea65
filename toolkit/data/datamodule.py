"""The Lightning datamodule: datasets from the registry, a seeded self-sharding sampler, the collator.

The datamodule shards its own data: ``SeededSampler`` gives each rank a strided slice of one seeded
permutation (as ``DistributedSampler`` does), so DDP and FSDP ranks see disjoint samples and every run with
the same seed sees the same order. The trainer must therefore be built with
``use_distributed_sampler=False``, or Lightning would wrap this sampler in its own.

The training loader is resumable: Lightning does not fast-forward a plain loader when it resumes from a
checkpoint saved mid-epoch (it would replay the epoch from its first batch). ``ResumableDataLoader`` has
``state_dict`` / ``load_state_dict`` (Lightning stores them in the checkpoint's loop state), and after a
restore the sampler starts that epoch right after the last batch that was trained on.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler
from transformers import PreTrainedTokenizerBase

from toolkit import registry
from toolkit.data.collate import Collator
from toolkit.data.template import build_template
from toolkit.data.vocabulary import dataset_vocabulary  # noqa: F401  (re-exported: the old home)
from toolkit.errors import ChimeraError

_DERIVED = ("image_size",)


class SeededSampler(Sampler[int]):
    """A seeded permutation of ``range(n)``, reshuffled per epoch and sharded across ranks.

    Like ``DistributedSampler``: the order is ``randperm(n)`` from a generator seeded with ``seed + epoch``
    (``set_epoch`` is called by Lightning at each epoch start), and rank ``r`` of ``R`` takes positions
    ``r, r + R, r + 2R, ...``. With ``drop_last`` the tail that does not divide evenly is dropped; without it
    the permutation is padded by wrapping around, so every rank gets the same number of samples (a few
    samples then appear twice). ``rank`` / ``num_replicas`` default to torch.distributed's when initialised,
    else 0 / 1. Setting ``start = k`` makes the next iteration skip this rank's first ``k`` samples (used to
    resume mid-epoch; it resets to 0 once used). ``len()`` always counts the whole epoch.
    """

    def __init__(
        self,
        n: int,
        seed: int = 0,
        *,
        shuffle: bool = True,
        drop_last: bool = True,
        rank: int | None = None,
        num_replicas: int | None = None,
    ):
        if num_replicas is not None and num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        if rank is not None and num_replicas is not None and not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        self.n = int(n)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self._rank = rank
        self._num_replicas = num_replicas
        self.epoch = 0
        self.start = 0  # positions of this rank's shard to skip in the next iteration only (resume)

    @property
    def rank(self) -> int:
        if self._rank is not None:
            return self._rank
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    @property
    def num_replicas(self) -> int:
        if self._num_replicas is not None:
            return self._num_replicas
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        R = self.num_replicas
        return self.n // R if self.drop_last else -(-self.n // R)

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = len(self) * self.num_replicas
        if total <= len(order):
            order = order[:total]
        elif order:  # pad by wrapping around so every rank has len(self) samples
            order = (order * (-(-total // len(order))))[:total]
        start, self.start = self.start, 0
        return iter(order[self.rank : total : self.num_replicas][start:])


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a ``SeededSampler`` that resumes mid-epoch.

    It counts the batches it has handed out in the current epoch. ``state_dict()`` returns
    ``{"epoch", "batches"}``; Lightning saves it with the loop state in every checkpoint (the loader is
    ``_Stateful``) and calls ``load_state_dict`` on resume. The next iteration over the same epoch then starts
    after those batches (sampler-side: nothing is loaded twice), and Lightning's own batch counter, restored
    from the same checkpoint, ends the epoch at the usual length. The count is exact because Lightning does
    not prefetch from a loader with a length; worker prefetching happens below this count.

    The iterator is created lazily, at the first ``next()``: Lightning calls ``iter()`` before it calls the
    sampler's ``set_epoch`` on resume, and the epoch must be known to decide whether to skip.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._epoch = 0  # the epoch of the current (or last) iteration
        self._batches = 0  # batches handed out in it
        self._pending: dict[str, int] | None = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self._batches}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self._pending = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}

    def __iter__(self) -> Iterator[Any]:
        return self._iterate()

    def _iterate(self) -> Iterator[Any]:
        skip, pending, self._pending = 0, self._pending, None
        epoch = int(getattr(self.sampler, "epoch", 0))
        if pending is not None and pending["epoch"] == epoch:
            skip = min(pending["batches"], len(self))
        if skip:
            self.sampler.start = skip * self.batch_size
        self._epoch, self._batches = epoch, skip
        for batch in super().__iter__():
            self._batches += 1
            yield batch


class ChimeraDataModule(L.LightningDataModule):
    """Train/val datasets built from config nodes, batched by ``Collator``, sharded by ``SeededSampler``.

    This datamodule shards itself across ranks; build the trainer with ``use_distributed_sampler=False``.

    Args:
        train: dataset node ``{name: ..., **kwargs}`` (built with ``image_size`` derived from the encoder).
        val: dataset node or None (no validation: ``val_dataloader`` returns ``[]``, which Lightning skips).
        tokenizer: from ``toolkit.data.load_tokenizer``.
        image_tokens: tokens one image produces (the collator reserves that many slots per ``<image>``).
        image_size: input side of the vision encoder, passed to datasets that take ``image_size``.
        batch_size: per-rank train batch size; ``val_batch_size`` defaults to it.
        num_workers: DataLoader workers (persistent when > 0).
        max_length: longest token sequence (see ``toolkit.data.collate.encode``).
        seed: seeds the training order (``seed + epoch``); dataset nodes keep their own ``seed``.
        template: the prompt template, a ``data.template`` node ``{name: ..., **kwargs}``, a name, or a built
            template; None is ``vicuna_v1``. Built (and checked) here, before any loader exists.
        vision: the vision data path (``toolkit.data.vision.VisionProcessor``, from the model's token plan and
            the encoder's data config): preprocessing, AnyRes tiles, per-image token counts and the token
            budget, run by the collator in the workers. None: one view per image, a bicubic resize to
            ``image_size`` and ``image_tokens`` each (``VisionProcessor.plain``).

    Every batch carries ``n_truncated``, the number of its samples cut at ``max_length``, and with ``vision``
    ``n_over_budget``, those the token budget reduced (see ``Collator``).
    """

    def __init__(
        self,
        train: Mapping[str, Any] | str,
        val: Mapping[str, Any] | str | None = None,
        *,
        tokenizer: PreTrainedTokenizerBase,
        image_tokens: int,
        image_size: int,
        batch_size: int = 16,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        max_length: int = 512,
        seed: int = 0,
        template: Any = None,
        vision: Any = None,
    ):
        super().__init__()
        if batch_size < 1 or (val_batch_size is not None and val_batch_size < 1):
            raise ChimeraError(f"data.batch_size must be >= 1, got {batch_size} (val {val_batch_size})")
        registry.validate("dataset", train, "data.train", derived=_DERIVED)
        if val is not None:
            registry.validate("dataset", val, "data.val", derived=_DERIVED)
        self.train_node, self.val_node = train, val
        self.tokenizer = tokenizer
        self.image_tokens = int(image_tokens)
        self.image_size = int(image_size)
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.max_length = int(max_length)
        self.seed = int(seed)
        self.template = build_template(template, "data.template")
        if vision is None:  # every dataset's images still go through the one vision path
            from toolkit.data.vision import VisionProcessor

            vision = VisionProcessor.plain(image_size, image_tokens)
        self.vision = vision
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is None:
            self.train_dataset = registry.build(
                "dataset", self.train_node, "data.train", image_size=self.image_size
            )
        if self.val_node is not None and self.val_dataset is None:
            self.val_dataset = registry.build(
                "dataset", self.val_node, "data.val", image_size=self.image_size
            )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        sampler = SeededSampler(len(self.train_dataset), self.seed, shuffle=True, drop_last=True)
        if len(sampler) < self.batch_size:
            raise ChimeraError(
                f"data.train: {len(self.train_dataset)} samples over {sampler.num_replicas} rank(s) give no "
                f"full batch of data.batch_size={self.batch_size}; use more samples or a smaller batch"
            )
        return self._loader(self.train_dataset, sampler, self.batch_size, "data.train", drop_last=True)

    def val_dataloader(self) -> DataLoader | list:
        self.setup()
        if self.val_dataset is None:
            return []  # Lightning skips validation
        sampler = SeededSampler(len(self.val_dataset), self.seed, shuffle=False, drop_last=False)
        return self._loader(self.val_dataset, sampler, self.val_batch_size, "data.val", drop_last=False)

    def _loader(
        self, dataset: Dataset, sampler: Sampler, batch_size: int, where: str, drop_last: bool
    ) -> DataLoader:
        cls = ResumableDataLoader if where == "data.train" else DataLoader
        return cls(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=Collator(
                self.tokenizer,
                self.image_tokens,
                self.max_length,
                where=where,
                template=self.template,
                vision=self.vision,
            ),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            drop_last=drop_last,
            generator=torch.Generator().manual_seed(self.seed),  # worker base seeds
        )
