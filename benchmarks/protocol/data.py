"""Train/val/test data as the protocol reads it: tensors (the fast path) or a DataLoader, whole or one rank's
share of every batch (data parallel)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["Batch", "Split", "PeekableBatches", "share", "shard_loader", "to_device"]

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


class Split:
    """A train/val/test split: either tensors (fast path) or a DataLoader."""

    def __init__(self, data: Any, batch_size: int) -> None:
        self.loader: DataLoader | None = None
        self.tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
        if isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
            if len(data) not in (2, 3):
                raise ValueError(f"tensor data must be (x, y) or (x, y, group), got {len(data)} tensors")
            x, y = data[0], data[1]
            g = data[2] if len(data) == 3 else None
            if len(x) != len(y) or (g is not None and len(g) != len(y)):
                raise ValueError("x, y (and group) must have the same length")
            self.tensors = (x, y.long(), None if g is None else g.long())
        elif isinstance(data, DataLoader):
            self.loader = data
        elif isinstance(data, Dataset):
            self.loader = DataLoader(data, batch_size=batch_size, shuffle=False)
            self._dataset_batch = batch_size
        else:
            raise TypeError(
                "data must be a tuple of tensors (x, y[, group]), a torch Dataset or a DataLoader, got "
                f"{type(data).__name__}"
            )

    def __len__(self) -> int:
        if self.tensors is not None:
            return len(self.tensors[1])
        return len(self.loader.dataset)  # type: ignore[union-attr, arg-type]

    @property
    def has_groups(self) -> bool:
        if self.tensors is not None:
            return self.tensors[2] is not None
        return True  # decided per batch

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool,
        generator: torch.Generator | None = None,
        min_last: int = 1,
        shard: tuple[int, int] | None = None,
        split: bool = True,
    ) -> Iterator[Batch]:
        """The batches; with ``shard=(rank, world)`` only this rank's part: its contiguous share of every
        batch (``split``, training: the global batches are unchanged) or every world-th whole batch
        (evaluation). A share may be empty (a last batch smaller than the world)."""
        if self.tensors is not None:
            return self._tensor_batches(batch_size, shuffle, generator, min_last, shard, split)
        loader = self.loader
        if shuffle and isinstance(self.loader.dataset, Dataset) and getattr(self, "_dataset_batch", None):  # type: ignore[union-attr]
            # the permutation the tensor path draws: the same data as a Dataset or as tensors, the same batches
            order = torch.randperm(len(self), generator=generator).tolist()
            loader = DataLoader(self.loader.dataset, batch_size=batch_size, sampler=order)  # type: ignore[union-attr]
        if shard is not None:
            loader = shard_loader(loader, *shard, split)  # type: ignore[arg-type]
        return _loader_batches(loader, sharded=shard is not None)

    def _tensor_batches(self, batch_size: int, shuffle: bool, generator: torch.Generator | None, min_last: int,
                        shard: tuple[int, int] | None, split: bool) -> Iterator[Batch]:
        x, y, g = self.tensors  # type: ignore[misc]
        n = len(y)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for k, start in enumerate(range(0, n, batch_size)):
            idx = order[start : start + batch_size]
            if start > 0 and len(idx) < min_last:
                break
            if shard is not None and split:
                idx = idx[share(len(idx), *shard)]
            elif shard is not None and k % shard[1] != shard[0]:
                continue
            yield x[idx], y[idx], None if g is None else g[idx]


class PeekableBatches:
    """One epoch's training batches, readable ahead: :meth:`peek` returns the first ``n`` and keeps them,
    iteration then yields every batch from the first. Reading ahead draws nothing extra from the shuffling
    generator, so it changes neither the batches nor their order (nor a later epoch's)."""

    def __init__(self, batches: Iterator[Batch]) -> None:
        self._source = iter(batches)
        self._ahead: list[Batch] = []

    def peek(self, n: int) -> list[Batch]:
        """The first ``n`` batches (fewer if the epoch has fewer); only before iteration starts."""
        while len(self._ahead) < n:
            batch = next(self._source, None)
            if batch is None:
                break
            self._ahead.append(batch)
        return self._ahead[:n]

    def __iter__(self) -> Iterator[Batch]:
        while self._ahead:
            yield self._ahead.pop(0)
        yield from self._source


def _as_batch(item: Any) -> Batch:
    """A loader's item (``(x, y[, group])`` or a dict with keys x, y[, group]) as tensors."""
    if isinstance(item, dict):
        xb, yb, gb = item["x"], item["y"], item.get("group")
    else:
        xb, yb = item[0], item[1]
        gb = item[2] if len(item) > 2 else None
    return xb, torch.as_tensor(yb).long(), None if gb is None else torch.as_tensor(gb).long()


def _loader_batches(loader: Any, sharded: bool) -> Iterator[Batch]:
    empty: Batch | None = None
    for item in loader:
        if item is None:  # this rank's share of a batch smaller than the world
            if empty is None:
                raise ValueError("a training batch smaller than the number of ranks came first")
            yield empty
            continue
        batch = _as_batch(item)
        if sharded:
            empty = tuple(None if t is None else t[:0] for t in batch)  # type: ignore[assignment]
        yield batch


def share(n: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s contiguous share of ``n`` items (sizes differ by at most one, like tensor_split)."""
    q, r = divmod(n, world)
    start = rank * q + min(rank, r)
    return slice(start, start + q + (rank < r))


class _ShardedBatches:
    """A batch sampler's batches, restricted to one rank (see ``Split.batches``)."""

    def __init__(self, batches: Any, rank: int, world: int, split: bool) -> None:
        self.batches, self.rank, self.world, self.split = batches, rank, world, split

    def __iter__(self) -> Iterator[list[int]]:
        for k, batch in enumerate(self.batches):
            if self.split:
                batch = list(batch)
                yield batch[share(len(batch), self.rank, self.world)]
            elif k % self.world == self.rank:
                yield batch

    def __len__(self) -> int:
        n = len(self.batches)
        return n if self.split else len(range(self.rank, n, self.world))


class _EmptyAsNone:
    """Collate an empty index list to None (a rank's empty share) instead of failing."""

    def __init__(self, collate: Callable[[list[Any]], Any]) -> None:
        self.collate = collate

    def __call__(self, items: list[Any]) -> Any:
        return self.collate(items) if items else None


def shard_loader(loader: DataLoader, rank: int, world: int, split: bool) -> Any:
    """``loader`` reading only this rank's share of each batch (or its whole batches); the batch sampler
    (and so the shuffling generator) is the same on every rank."""
    if loader.batch_sampler is None:  # iterable dataset or no automatic batching: shard after loading
        def sliced() -> Iterator[Any]:
            for k, item in enumerate(loader):
                if split:
                    n = len(item["y"] if isinstance(item, dict) else item[1])
                    sl = share(n, rank, world)
                    yield {k_: v[sl] for k_, v in item.items()} if isinstance(item, dict) else [t[sl] for t in item]
                elif k % world == rank:
                    yield item
        return sliced()
    return DataLoader(
        loader.dataset,
        batch_sampler=_ShardedBatches(loader.batch_sampler, rank, world, split),
        num_workers=loader.num_workers,
        collate_fn=_EmptyAsNone(loader.collate_fn),
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator,
        prefetch_factor=loader.prefetch_factor,
        persistent_workers=loader.persistent_workers,
    )


def to_device(x: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    x = x.to(device)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x
