"""The run list: every (variant, method, lr, seed), in a fixed order, identified by a hash."""

from __future__ import annotations

from dataclasses import dataclass

from ..protocol.select import candidates_for
from ..runs import config_hash

__all__ = ["Run", "enumerate_runs", "shard_runs", "runs_for", "SELECTED_IN_REPORT"]

#: methods that are no run of their own: the report picks, per seed, among their candidates' runs (the choice
#: ``benchmarks.protocol.select_method`` makes, over the same runs: no extra compute)
SELECTED_IN_REPORT = ("auto_select",)


@dataclass(frozen=True)
class Run:
    dataset: str  # variant key, e.g. "cifar10c/fog/5"
    family: str
    method: str
    lr: float | None
    seed: int
    config_id: str

    @property
    def run_id(self) -> str:
        return config_hash([self.dataset, self.method, self.lr, self.seed, self.config_id], 20)


def enumerate_runs(
    variants: list[str],
    family: str,
    methods: list[str],
    lrs: list[float],
    seeds: list[int],
    config_id: str,
) -> list[Run]:
    """All runs in a fixed order (variant, method, lr, seed); "none" has a single lr (None) per seed."""
    return [Run(v, family, m, lr, s, config_id) for v in variants for m in methods
            for lr in ([None] if m == "none" else lrs) for s in seeds]


def runs_for(methods: list[str], blocks: list[str]) -> list[str]:
    """The methods to run for ``methods`` (canonical names): ``auto_select`` stands for its candidates, every
    block alone and ``all`` (``benchmarks.protocol.select.candidates_for``), each run once."""
    out: list[str] = []
    for m in methods:
        out.extend(candidates_for(blocks) if m in SELECTED_IN_REPORT else [m])
    return list(dict.fromkeys(out))


def shard_runs(runs: list[Run], shard: tuple[int, int]) -> list[Run]:
    i, n = shard
    return [r for k, r in enumerate(runs) if k % n == i]
