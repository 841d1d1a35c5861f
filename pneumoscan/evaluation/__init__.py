"""Judging a model on labelled folders: metrics, plots, `pneumoscan eval`."""
