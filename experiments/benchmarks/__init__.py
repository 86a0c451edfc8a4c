"""Benchmarks: each measures ravine against its peer in the same run and prints ratios
(`python -m ravine.experiments.benchmarks.bench_<name> --help`). They are not tests."""
