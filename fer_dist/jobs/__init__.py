"""Whole jobs built from the stages: feature extraction, prediction, cross-validation, the demo."""
