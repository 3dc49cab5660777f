"""Evaluation: model quality on the synthetic task, policy sweeps, curves."""
