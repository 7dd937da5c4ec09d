"""Benchmarks, run with ``python -m bench`` (see ``bench/__main__.py``)."""
