"""Evaluation: the analytic shapes checker, caption metrics, generation metrics."""
