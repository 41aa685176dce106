"""Early stopping on a plateau of one learning rate's validation score (``ProtocolConfig.patience``)."""

from __future__ import annotations

__all__ = ["Plateau"]


class Plateau:
    """Counts the epochs since this lr's best validation accuracy; :attr:`stalled` once ``patience`` epochs in
    a row brought no higher one. ``patience=None`` never stalls.

    Accuracy alone, not the selection's (accuracy, lower loss) order: on a small validation split the
    accuracy settles while the loss keeps falling a little every epoch at a small lr, and counting that as
    progress kept the smallest lr of the grid running to the last epoch in most runs (the selection still
    breaks accuracy ties by the loss, over the epochs that ran)."""

    def __init__(self, patience: int | None) -> None:
        self.patience = patience
        self.best: float | None = None
        self.since_best = 0

    def offer(self, score: float) -> None:
        if self.best is None or score > self.best:
            self.best, self.since_best = score, 0
        else:
            self.since_best += 1

    @property
    def stalled(self) -> bool:
        return self.patience is not None and self.since_best >= self.patience
