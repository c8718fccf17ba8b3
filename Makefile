# Two commands matter: `make demo` and `make test`. Both set up what they need.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dtta-setup
export PATH := $(HOME)/.cargo/bin:$(PATH)
# tch builds against the venv's torch package (it holds include/ and lib/). Looked up by
# the shell when a recipe runs: make's own wildcard caches the tree before setup made it.
CARGO := LIBTORCH="$$(ls -d $(CURDIR)/$(VENV)/lib/python3*/site-packages/torch | head -n 1)" cargo
BIN := target/release/dtta

.PHONY: help setup build demo test check-python fmt clean

help:
	@echo "make demo   set up, build, run the demo pipeline, summarize its output"
	@echo "make test   set up, build, run every test"

# Reuses an existing .venv; reinstalls only when tools/requirements.txt changes.
$(STAMP): tools/requirements.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r tools/requirements.txt
	@touch $@

setup: $(STAMP)

build: setup
	$(CARGO) build --release

demo: build
	rm -rf out/demo
	$(BIN) run pipelines/demo.toml
	@echo
	$(BIN) summarize out/demo/
	@echo
	@echo "Predictions: out/demo/predictions/*.parquet (committed shards: out/demo/_commits/)"

test: setup
	$(CARGO) test --release -- --test-threads=2

fmt:
	cargo fmt --all

clean:
	$(CARGO) clean
	rm -rf out
