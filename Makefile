# The two set-up commands of the README. Both bootstrap .venv/ first (idempotent).
.PHONY: demo test bench

demo:
	@scripts/bootstrap.sh
	.venv/bin/medmpc train --data synthetic --model cnn --image-size 64 --epochs 4 --out runs/demo

test:
	@scripts/bootstrap.sh
	.venv/bin/python -m pytest -q tests

bench:
	@scripts/bootstrap.sh
	.venv/bin/python -m pytest -q benchmarks --benchmark-only
