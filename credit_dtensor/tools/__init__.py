"""Tooling around the library: training loop, synthetic data, checkpoints, demo, benchmarks and
the local process launcher. The core package never imports from here."""
