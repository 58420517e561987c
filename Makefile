# federated-mnist: `make run` sets everything up and runs the seed experiment;
# `make test` sets everything up and runs the whole test suite. Both are safe to run twice.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SHARED_MNIST ?= ../shared/mnist
CONFIG ?= configs/seed.yaml
PYTEST_ARGS ?=
export FEDMNIST_HOME ?= $(CURDIR)/.fedmnist

.PHONY: setup system-deps data run test smoke bench lint clean prefect-yaml serving-venv

# torch/torchvision pinned to the build this machine kind serves locally; the package itself
# only asks for torch>=2.1 so a Jetson's JetPack torch satisfies it.
$(VENV)/.ready: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,data,stack]'
	touch $@

setup: $(VENV)/.ready

system-deps:
	bash scripts/install-sshd.sh
	sh scripts/install-postgres.sh
	bash scripts/install-chromium.sh

data: setup
	$(BIN)/fedmnist data $(if $(wildcard $(SHARED_MNIST)/*.gz),--from $(SHARED_MNIST))

run: data
	$(BIN)/fedmnist run $(CONFIG)

smoke: data
	$(BIN)/fedmnist run configs/smoke.yaml

# the fresh venv (MLflow and torch only) a registered model is served from in the tests
serving-venv: setup
	$(BIN)/python scripts/serving_venv.py

test: data system-deps serving-venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# prefect.yaml is rendered from configs/deployments.yaml (tests/stack/test_prefect_yaml.py checks it)
prefect-yaml: setup
	$(BIN)/python -m flows.deployments --write prefect.yaml

bench: data
	$(BIN)/python benchmarks/seed_overhead.py

lint: setup
	$(BIN)/ruff check fedcore fedlab tasks flows tests benchmarks
	$(BIN)/ruff format --check fedcore fedlab tasks flows tests benchmarks
	$(BIN)/mypy fedcore fedlab tasks flows

clean:
	rm -rf $(VENV) .fedmnist
