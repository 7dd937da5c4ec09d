"""``python -m examples.fastapi_app``: the one-command demo."""

from .demo import main

main()
