"""Benchmark scripts (not installed with the package): run from the repository root as
`python -m benchmarks.tools.NAME`. Each folder of benchmarks/ says which produced its files."""
