.PHONY: test lint typecheck bench demo brokers

test:
	./scripts/test

lint:
	./scripts/lint

typecheck:
	.venv/bin/mypy --strict celerybridge pusher examples tests/typing

bench:
	.venv/bin/python -m bench

demo:
	./scripts/demo

brokers:
	./scripts/ensure-brokers
