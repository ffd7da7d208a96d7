# The two commands of the README's quick start. Each sets everything up first (idempotent).
.PHONY: serve test setup

setup:
	./scripts/setup.sh

serve: setup
	.venv/bin/kvtriton serve --demo "What is the capital of France?"

test: setup
	.venv/bin/python -m pytest -q
