# The two set-up commands of the README. Both bootstrap .venv/ first (idempotent).
.PHONY: demo test check bench

demo:
	@scripts/bootstrap.sh
	.venv/bin/medmpc demo --out runs/demo --overwrite

# formatting, lint, types and the one-way layers, then the tests
test: check
	.venv/bin/python -m pytest -q --durations=20 tests

check:
	@scripts/bootstrap.sh
	.venv/bin/ruff format --check .
	.venv/bin/ruff check .
	.venv/bin/mypy
	.venv/bin/lint-imports

bench:
	@scripts/bootstrap.sh
	.venv/bin/python -m pytest -q benchmarks --benchmark-only
