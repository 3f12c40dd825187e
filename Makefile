# The one entry point for developers, README and CI.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROTO_FILES := $(shell find protos -name '*.proto')
PROTOC := $(BIN)/python -m grpc_tools.protoc -I. \
  --plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy --plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc

.PHONY: help install proto proto-check lint fmt typecheck check test test-unit demo up down bench clean

help:
	@echo "make demo   - run the demo on the embedded default (SQLite, no servers)"
	@echo "make test   - lint, type-check and run every test (needs PostgreSQL at 127.0.0.1:5432)"
	@echo "make up     - start the stack in the background (.devstack/endpoints.json); make down"
	@echo "make proto  - regenerate the gRPC code from protos/"
	@echo "make bench  - run the benchmarks in bench/"

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

proto: install
	$(PROTOC) --python_out=. --grpc_python_out=. --mypy_out=. --mypy_grpc_out=. $(PROTO_FILES)

# The generated code is committed; fail when it no longer matches protos/.
proto-check: install
	@rm -rf .proto-check && mkdir -p .proto-check
	@$(PROTOC) --python_out=.proto-check --grpc_python_out=.proto-check \
	  --mypy_out=.proto-check --mypy_grpc_out=.proto-check $(PROTO_FILES)
	@cd .proto-check && for f in $$(find protos -type f); do \
	  cmp -s "$$f" "../$$f" || { echo "stale generated code: $$f (run 'make proto')"; exit 1; }; done
	@for f in $$(find protos -type f -name '*_pb2*'); do \
	  test -f ".proto-check/$$f" || { echo "generated code without its .proto: $$f"; exit 1; }; done
	@rm -rf .proto-check

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

typecheck: install
	$(BIN)/mypy

check: proto-check lint typecheck

test: check
	$(BIN)/python -m pytest

test-unit: install
	$(BIN)/python -m pytest tests/unit

demo: install
	$(BIN)/python -m services.demo

# The stack in the background (broker, shadow service, gateway); see .devstack/endpoints.json.
up: install
	$(BIN)/python -m services.devstack up

down:
	@if [ -x $(BIN)/python ]; then $(BIN)/python -m services.devstack down; fi

bench: install
	$(BIN)/python bench/shadow.py
	$(BIN)/python bench/fanout.py
	$(BIN)/python bench/download.py      # needs nginx (apt-get install -y nginx)

clean:
	rm -rf $(VENV) .devstack .proto-check .pytest_cache .mypy_cache .ruff_cache
