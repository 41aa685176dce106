"""The shared fine-tuning protocol: one training loop for every benchmark of this repository.

It follows the paper's official code (Lee et al., ICLR 2023): Adam with weight decay 1e-4 and no
schedule, batch 64, BatchNorm kept in eval mode (running statistics and dropout frozen; BN affine
parameters still train when their block does), a grid of learning rates, and the (lr, epoch) with the
best *target-validation* accuracy reported on *target test* (plus worst-group accuracy when group labels
are given).

Usage::

    from benchmarks.protocol import ProtocolConfig, finetune
    cfg = ProtocolConfig(lrs=(1e-2, 1e-3, 1e-4), epochs=15)
    result = finetune(model, "layer1", train=(x, y), val=(xv, yv), test=(xt, yt, groups), config=cfg, seed=0)
    result.test_acc, result.lr, result.epoch, result.to_dict()

Data: a tuple of tensors ``(x, y)`` or ``(x, y, group)``, a ``Dataset`` yielding such tuples, or a
``DataLoader`` (used as it is for training; its batch size and shuffling then apply).

Methods (``method`` argument, a string or a :class:`Method` instance):

* ``"none"``: no adaptation (evaluated once, no lr grid);
* ``"all"``: full fine-tuning;
* a block name of the split (``"stem"``, ``"layer1"``, ... ``"fc"`` by default), or ``"first"``,
  ``"last"``, or ``"block:<name>"``: that block alone (``surgical_optim.select_blocks``);
* ``"auto_rgn"``: ``surgical_optim.AutoRGN`` around the optimizer over all blocks;
* ``"auto_snr"``: ``surgical_optim.AutoSNR`` (options: ``threshold``, ``samples``, ``estimator``);
* ``"gradual_last_first"`` / ``"gradual_first_last"``: gradual unfreezing, one more block every
  ``epochs / n_blocks`` epochs (rounded up), starting from the last (resp. first) block;
* ``"l1_sp"``: full fine-tuning plus ``strength * sum |theta - theta_pretrained|`` (option ``strength``);
* ``"auto_rgn_paper"``: Auto-RGN as the official code runs it (:class:`AutoRGNPaper`: multipliers from the
  first ``batches`` batches of each epoch, a fresh optimizer every epoch, ``exclude="bn"`` frozen);
* ``"auto_select"``: every block alone and ``all`` (or ``method_options["auto_select"]["candidates"]``), the
  one with the best validation score reported (:func:`select_method`; :func:`select_from_results` over results
  at hand).

Names are read by one parser (:func:`method_names`: the aliases of :data:`ALIASES`, ``block:*`` for one
run per block). New methods: subclass :class:`Method` and call :func:`register_method`. Options for a method
travel in ``ProtocolConfig.method_options[name]``. A method may replace the optimizer at the start of every
epoch after looking at that epoch's first training losses (:meth:`Method.epoch_optimizer`).

Early stopping: ``ProtocolConfig(patience=k)`` ends an lr's run after k epochs in a row without a higher
validation accuracy of that lr (a tie with a lower loss is not progress); its curve then holds only the epochs that ran
(``FinetuneResult.epochs_run``; ``FinetuneResult.steps`` counts the optimizer steps). Every epoch that ran is
trained and evaluated exactly as without stopping, so the selection is the full run's over those epochs.

The block split is an input: ``ProtocolConfig(blocks=matcher)`` (a ``surgical_optim`` matcher, parameter
name -> block name; default the library's split). Every method resolves its blocks through
``surgical_optim.select_blocks`` / ``param_groups_by_block`` with it, and the frozen-prefix precompute splits
the model into stages along the same blocks.

Speed: when the data are tensors and the model can be split into sequential stages, one per block
(torchvision-ResNet layout or an ``nn.Sequential``, grouped by the split; or an explicit ``stages=`` list),
the blocks the method leaves frozen in front of the first trainable one are run once per split, and only the rest of the network is trained. This is exact
because BatchNorm is in eval mode and there is no data augmentation. Pass a shared
:class:`PrefixCache` to :func:`finetune` to reuse the activations across methods on the same data.

Data parallel (DDP): when a ``torch.distributed`` process group with more than one rank is initialised
(or with ``ProtocolConfig(distributed=True)``), every rank calls :func:`finetune` with the same arguments;
each rank trains on its contiguous share of every global batch (same seed, same batch order, global batch
= ``batch_size``), the trained module (the whole copy, or the suffix after a precomputed prefix) is wrapped
in ``DistributedDataParallel``, the loss is scaled so that the averaged gradient is that of the global
batch's mean loss, and evaluation is sharded over the ranks (whole batches) and gathered, so every rank
selects the same (lr, epoch) and returns the same result. The frozen-prefix precompute runs on every rank.
"""

from .config import PAPER_LRS, EvalResult, FinetuneResult, ProtocolConfig, default_optimizer
from .evaluate import evaluate
from .loop import finetune
from .methods import (
    ALIASES,
    SELECTION_METHODS,
    AutoRGNMethod,
    AutoSNRMethod,
    BlockFineTuning,
    FullFineTuning,
    GradualUnfreezing,
    L1SP,
    Method,
    NoAdaptation,
    available_methods,
    make_method,
    method_names,
    register_method,
)
from .paper_rgn import AutoRGNPaper
from .select import candidates_for, default_candidates, select_from_results, select_method
from .stages import PrefixCache, split_stages

__all__ = [
    "PAPER_LRS",
    "ProtocolConfig",
    "FinetuneResult",
    "EvalResult",
    "Method",
    "NoAdaptation",
    "FullFineTuning",
    "BlockFineTuning",
    "AutoRGNMethod",
    "AutoSNRMethod",
    "GradualUnfreezing",
    "L1SP",
    "AutoRGNPaper",
    "ALIASES",
    "SELECTION_METHODS",
    "PrefixCache",
    "register_method",
    "make_method",
    "method_names",
    "available_methods",
    "finetune",
    "select_method",
    "select_from_results",
    "candidates_for",
    "default_candidates",
    "evaluate",
    "split_stages",
    "default_optimizer",
]
