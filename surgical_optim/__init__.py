"""surgical-optim: surgical fine-tuning for PyTorch (Lee et al., ICLR 2023, arXiv 2210.11466).

Public API:

* ``param_groups_by_block(model)`` - the model's parameters as ordered, named param groups (blocks).
* ``select_blocks(model, which)`` - freeze all but the chosen blocks and return their groups;
  ``"first"`` is the paper's first block (input stem + first stage), ``"last"`` the output head.
* ``block_names(model)``, ``trainable_report(model)`` - the blocks, and their sizes as a table.
* ``keep_norm_eval(model)`` - BatchNorm in eval mode (pre-trained statistics), even after ``model.train()``.
* ``AutoRGN(optimizer)`` - per-tensor learning rate scaled by the normalised relative gradient norm.
* ``AutoSNR(optimizer, threshold)`` - freeze tensors whose normalised gradient SNR is below a threshold.
* ``per_example_gradient_snr(...)`` - per-tensor gradient SNR over the examples of one batch.
* ``adapt_online(model, optimizer, batches)`` - predict each unlabeled batch, then adapt on it
  (entropy or MEMO's marginal entropy), with whatever blocks the optimizer holds.

Types: ``BlockMatcher``, ``BlockSelector`` (arguments); ``TrainableReport``/``BlockRow``,
``BlockSummary`` (the wrappers' ``block_summary()``), ``NormEvalHandle`` (results);
``UnknownBlockError`` (an unknown block name).
"""

from ._summary import BlockSummary
from .auto_rgn import AutoRGN
from .auto_snr import AutoSNR
from .blocks import (
    BlockMatcher,
    BlockRow,
    BlockSelector,
    TrainableReport,
    UnknownBlockError,
    block_names,
    param_groups_by_block,
    select_blocks,
    trainable_report,
)
from .norm import NormEvalHandle, keep_norm_eval
from .online import adapt_online
from .snr import per_example_gradient_snr

__version__ = "0.5.0"

__all__ = [
    "AutoRGN",
    "AutoSNR",
    "BlockMatcher",
    "BlockRow",
    "BlockSelector",
    "BlockSummary",
    "NormEvalHandle",
    "TrainableReport",
    "UnknownBlockError",
    "adapt_online",
    "block_names",
    "keep_norm_eval",
    "param_groups_by_block",
    "per_example_gradient_snr",
    "select_blocks",
    "trainable_report",
    "__version__",
]
