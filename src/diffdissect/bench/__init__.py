"""Benchmarks: figures measured as ratios against a baseline run side by side."""
