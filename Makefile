.PHONY: test lint typecheck bench demo brokers

test:
	./scripts/test

lint:
	./scripts/lint

typecheck:
	.venv/bin/mypy --strict celerybridge pusher tests/typing

bench:
	.venv/bin/python -m bench

demo:
	.venv/bin/celerybridge demo

brokers:
	./scripts/ensure-brokers
