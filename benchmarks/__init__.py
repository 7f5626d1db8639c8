"""Benchmarks of the strategies and the layers under them; see benchmarks/README.md.

A package so that ``benchmarks/strategies.py`` is ``benchmarks.strategies`` and never shadows the
project's own ``strategies`` package: every script puts the repository, not its own folder, first
on ``sys.path``.
"""
