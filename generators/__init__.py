"""Generators: seed pairs in, new preference pairs out — one module per family.

Each module registers its step with ``@generator`` (see :mod:`factory.steps`); the
registry imports every module here, so a new generator is one file plus one decorator.
"""
