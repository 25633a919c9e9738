"""Benchmarks for perce-ds: CE vs PerCE step cost, log-prob memory, and a GPU check script.

Each script prints a table and, with ``--json PATH``, writes machine-readable results; ``--smoke`` runs a
tiny size so CI can keep them from rotting (tests/test_benchmarks.py).
"""
