"""Benchmarks of hf_distill (`make bench`). Timings live here, never in the tests."""
