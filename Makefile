.PHONY: test lint typecheck bench demo brokers faults

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

# The long fault suite (5,000 uploads and 20 kills per case); its table goes to
# faults-report.jsonl (see docs/reliability.md).
faults:
	./scripts/ensure-brokers
	rm -f faults-report.jsonl
	CELERYBRIDGE_FAULTS=long CELERYBRIDGE_FAULTS_REPORT=$(CURDIR)/faults-report.jsonl \
		.venv/bin/python -m pytest tests/faults --timeout 3600 -v
