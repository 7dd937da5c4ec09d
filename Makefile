.PHONY: test unit lint typecheck docs docs-serve bench demo brokers faults

test:
	./scripts/test

# The unit tests only: no broker, no browser (see scripts/test).
unit:
	./scripts/test --unit

lint:
	./scripts/lint

typecheck:
	.venv/bin/mypy --strict celerybridge pusher examples tests/typing

# The docs into site/, strict: a broken link or anchor fails (tests/test_docs.py does the same).
docs:
	NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict

docs-serve:
	NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs serve

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

# The long fuzz run: over 10,000 malformed messages and raw broker entries per broker to
# live pushers (with and without a signing key). Figures go to fuzz-report.jsonl and
# fuzz-report.md, each case that broke an invariant to fuzz-repro/ (see tests/fuzz/).
.PHONY: fuzz
fuzz:
	./scripts/ensure-brokers
	rm -rf fuzz-report.jsonl fuzz-report.md fuzz-repro
	CELERYBRIDGE_FUZZ=long CELERYBRIDGE_FUZZ_REPORT=$(CURDIR)/fuzz-report.jsonl \
		CELERYBRIDGE_FUZZ_MARKDOWN=$(CURDIR)/fuzz-report.md \
		CELERYBRIDGE_FUZZ_REPRO=$(CURDIR)/fuzz-repro \
		.venv/bin/python -m pytest tests/fuzz/test_fuzz.py --timeout 7200 -v
