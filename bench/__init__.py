"""Tidings' benchmark harness: ``make bench`` or ``python -m bench [FIGURE ...]``.

Every figure is a ratio against a baseline measured in the same run on the same
machine, never an absolute timed assertion. See docs/benchmarks.md.
"""
