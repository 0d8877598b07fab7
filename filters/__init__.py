"""Filters: per-row scores first, then a separate threshold decides keep / drop / flip /
weight — one module per family, registered with ``@filter_step`` (see :mod:`factory.steps`).
"""
