"""Where a suite's jobs run: worker processes, or this process when one worker is asked for."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

__all__ = ["InlineExecutor", "worker_pool"]


class InlineExecutor(Executor):
    """Runs each job when it is submitted, in this process; a job's exception is re-raised by
    ``future.result()``, as a pool's would be."""

    def submit(self, fn, /, *args, **kwargs) -> Future:  # type: ignore[override]
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)
        return future


def worker_pool(workers: int, initializer: Callable[..., Any] | None = None, initargs: tuple = ()) -> Executor:
    """``workers`` spawned worker processes (each runs ``initializer(*initargs)`` first), or, for ``workers <= 1``,
    an :class:`InlineExecutor` after running ``initializer(*initargs)`` here."""
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        return InlineExecutor()
    return ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=initializer,
                               initargs=initargs)
