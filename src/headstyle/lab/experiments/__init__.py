"""Experiments in the lab, scored against its ground truth: evaluate, demo, bench, the SFA ablation."""
