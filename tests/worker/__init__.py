"""Tests of the worker side (``celerybridge/_worker/``)."""
