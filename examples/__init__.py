"""Runnable examples of celerybridge (not part of the installed package)."""
