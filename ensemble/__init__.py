"""Ensembles of the best trials: soft/hard/weighted voting and model soups, reported honestly."""
