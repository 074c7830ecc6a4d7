"""Benchmarks: speed and memory measurements that write JSON (not tests)."""
