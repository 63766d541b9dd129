"""Benchmarks of specdec_ops: the pytest-benchmark suite (``bench_*.py``) and the harness it shares with
``scripts/profile_fused_vs_unfused.py``."""
