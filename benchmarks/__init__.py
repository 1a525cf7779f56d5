"""Whole-system benchmarks: they build bases, registries and servers, so they live above every package."""
