"""Metrics, landmark policy, statistics, evaluation over files and benchmarks."""
