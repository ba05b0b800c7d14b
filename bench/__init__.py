"""Benchmarks of pgnet-curl end to end: `python -m bench <scenario>`; see bench/RESULTS.md."""
