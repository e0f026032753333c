"""Datasets, chat template and the synthetic task."""
