"""The paper's seven-dataset benchmark (``python -m benchmarks.paper``; usage in benchmarks/README.md).

Modules: ``cli`` (the command line, parsed once into the typed configs of ``config``), ``sweep`` (the run loop),
``plan`` (the run list and run ids), ``data`` (loaders and the target splits), ``source`` (the source model),
``finetune`` (one run through ``benchmarks.protocol``), ``results`` (selection, table, plot), ``models``
(architectures and the paper's block splits).
"""

from .cli import PROG, build_parser, harness_config, main
from .config import DEFAULT_METHODS, FAMILIES, HarnessConfig, UsageError
from .plan import Run, enumerate_runs, runs_for
from .sweep import paper_blocks

__all__ = ["main", "build_parser", "harness_config", "enumerate_runs", "runs_for", "Run", "FAMILIES",
           "DEFAULT_METHODS", "UsageError", "HarnessConfig", "paper_blocks", "PROG"]
