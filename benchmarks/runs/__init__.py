"""What both benchmark suites do with a run, in one place: its identity (a hash of everything it depends on),
atomic files, the JSON-lines store, the (lr, epoch) selection rule, mean ± standard error over seeds,
supervised source pre-training and the worker pool jobs run in. Evaluation is ``benchmarks.protocol.evaluate`` (fractions; percent only where
a number is printed or shown in a table)."""

from .files import atomic_torch_save, atomic_write_bytes, atomic_write_text, config_hash, read_json
from .pretrain import train_supervised
from .stats import Cell, mean_se, select, selection_key
from .store import ResultStore, read_results
from .workers import InlineExecutor, worker_pool

__all__ = [
    "config_hash",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_torch_save",
    "read_json",
    "ResultStore",
    "read_results",
    "selection_key",
    "select",
    "mean_se",
    "Cell",
    "train_supervised",
    "InlineExecutor",
    "worker_pool",
]
