"""Evaluation: metrics, baselines, the bench, plots and the HTML report."""
