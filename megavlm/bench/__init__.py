"""Benchmarks whose results are committed as dated markdown under benchmarks/."""
