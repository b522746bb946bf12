"""Benchmarks: each prints its figures and writes JSON (see bench/README.md)."""
