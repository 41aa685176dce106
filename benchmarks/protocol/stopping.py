"""Early stopping on a plateau of one learning rate's validation score (``ProtocolConfig.patience``)."""

from __future__ import annotations

__all__ = ["Plateau"]


class Plateau:
    """Counts the epochs since this lr's best validation score; :attr:`stalled` once ``patience`` epochs in a
    row brought no new best. Scores are ``selection_key(val_acc, val_loss)`` (higher is better): the order
    the (lr, epoch) selection uses, so "no new best" means "no epoch the selection would prefer to this lr's
    best so far". ``patience=None`` never stalls."""

    def __init__(self, patience: int | None) -> None:
        self.patience = patience
        self.best: tuple[float, float] | None = None
        self.since_best = 0

    def offer(self, score: tuple[float, float]) -> None:
        if self.best is None or score > self.best:
            self.best, self.since_best = score, 0
        else:
            self.since_best += 1

    @property
    def stalled(self) -> bool:
        return self.patience is not None and self.since_best >= self.patience
