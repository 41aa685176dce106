"""Benchmarks for surgical-optim: the paper's seven-dataset evaluation (see benchmarks/README.md)."""
