"""Evaluation: sample and grade benchmarks, pass@k / cons@k reports, the held-out suite."""
