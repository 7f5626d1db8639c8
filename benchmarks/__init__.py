"""Benchmarks of the strategies and the layers under them; see benchmarks/README.md.

A package so that the scripts share their helpers as ``benchmarks.common``, ``benchmarks.harness``
...: every script puts the repository, not its own folder, first on ``sys.path``.
"""
