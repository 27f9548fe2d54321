"""Benchmarks against peers (``pflow-dist bench``): harness, registry of benchmarks, reports."""

from .harness import BenchRow, Timing, measure, ratios, read_jsonl, versions, write_jsonl
from .registry import BENCHES, Bench, Case, Impl, get_bench, run_bench

__all__ = [
    "BENCHES", "Bench", "BenchRow", "Case", "Impl", "Timing", "get_bench", "measure", "ratios", "read_jsonl",
    "run_bench", "versions", "write_jsonl",
]
