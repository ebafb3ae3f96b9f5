"""Benchmarks of IDAP++ against torch-pruning criteria on public data sets."""
