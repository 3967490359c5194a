"""Evaluation jobs on a pretrained MaMA: extract, zero-shot, linear probe, maps, report."""
