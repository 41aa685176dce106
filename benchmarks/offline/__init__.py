"""Offline reproduction of surgical fine-tuning (Lee et al., ICLR 2023) on procedural data, on a CPU.

``python -m benchmarks.offline`` pre-trains a small ResNet on procedural 32x32 shape images (cached),
fine-tunes it on small labeled target sets under input-level (corruptions), feature-level (unseen
subclasses) and output-level (label permutation, flipped spurious cue) shifts, plus the block-noise
experiment, with every method of the shared protocol (``benchmarks.protocol``), and runs the two-layer
theory check. Outputs under ``results/offline/``: ``table.md``, ``summary.json``,
``relative_to_full_ft.png``, ``block_noise.png``, ``auto_rgn_multipliers.png``. ``--quick`` is a smoke
test (one seed, tiny sets) writing to ``results/offline/quick/``.

Modules: ``data`` (generator, corruptions), ``model`` (SmallResNet), ``shifts``, ``pretrain`` (cached
source model), ``runner`` (tasks, caching, worker processes), ``theory`` (two-layer check), ``report`` and
``plots``; ``ablation`` (Auto-RGN ablations); ``stream``, ``augment``, ``stream_runner`` and ``stream_report``
(the unlabeled-stream experiment, its MEMO copies, its cached runs, its table and curves).
"""
