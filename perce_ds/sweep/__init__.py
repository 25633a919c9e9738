"""Validated sweeps: a grid of training runs x seeds, selection on validation, one scoring on test.

spec.py (the sweep recipe) -> cells.py (cells, their state on disk, running one) -> select.py (per-method
learning rate and checkpoint) -> scoring.py (test scores of the selected runs and the starting model) ->
bootstrap.py (user-level intervals) -> report.py (tables, JSON) and plots.py.
"""
