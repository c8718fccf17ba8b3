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
# Storage servers the integration tests start on loopback (see README, "Tests").
TOOLS := .tools
S3S_FS := $(TOOLS)/bin/s3s-fs
AZURITE := $(TOOLS)/azurite/node_modules/.bin/azurite-blob

.PHONY: help setup browser build demo demo-seg demo-depth test eval eval-classification eval-dense bench check-python fmt clean

help:
	@echo "make demo   set up, build, run the demo pipeline, summarize its output"
	@echo "make test   set up, build, run every test"
	@echo "make demo-seg, make demo-depth   the dense demos (segmentation, depth) under 4 corruptions"
	@echo "make eval   robustness evaluation: every method under 15 corruptions (README, \"Does it work?\")"
	@echo "            (make eval-classification, make eval-dense: one half each)"
	@echo "make bench  the performance figures, each against its baseline (README, \"Performance\")"

# Reuses an existing .venv; reinstalls only when tools/requirements.txt changes.
$(STAMP): tools/requirements.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r tools/requirements.txt
	@touch $@

# A debug build: a loopback test server needs no optimiser, and it compiles in half the
# time (94 s against 182 s on 2 cores), which is on a fresh CI run's critical path.
$(S3S_FS):
	cargo install --quiet --debug --root $(TOOLS) s3s-fs --version 0.14.1 --features binary

# Azurite 3.35.0: 3.36+ needs a newer Node than Debian's.
$(AZURITE):
	npm install --silent --no-audit --no-fund --prefix $(TOOLS)/azurite azurite@3.35.0

# Headless Chromium for tests/report_browser.rs: Debian's package, where apt-get exists
# and no browser is installed yet (root, or sudo). Elsewhere the test skips and says so.
CHROMIUM := /usr/bin/chromium
browser:
	@if [ ! -x $(CHROMIUM) ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian's chromium (for the browser test of dtta report)"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 \
	    || { $$SUDO apt-get update -qq >/dev/null && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	    || { echo "could not install chromium with apt-get" >&2; exit 1; }; \
	fi

# The four installs are independent (network, compiler, npm, apt): run them side by side.
setup:
	@$(MAKE) --no-print-directory -j4 $(STAMP) $(S3S_FS) $(AZURITE) browser

build: setup
	$(CARGO) build --release

demo: build
	rm -rf out/demo
	$(BIN) run pipelines/demo.toml
	@echo
	$(BIN) summarize out/demo/
	@echo
	@echo "Predictions: out/demo/predictions/ (a Delta table; dtta history out/demo/ lists its versions)"

# The dense demos (pipelines/demo-seg.toml, demo-depth.toml): one output per method,
# then one table over them (dataset-level mIoU, or AbsRel, per corruption).
demo-seg: build
	rm -rf out/demo-seg
	for method in source tent; do \
	  $(BIN) run pipelines/demo-seg.toml --no-progress \
	    --set tta.method=$$method --set output.url=out/demo-seg/$$method/ || exit 1; \
	done
	@echo
	$(BIN) summarize out/demo-seg/

demo-depth: build
	rm -rf out/demo-depth
	$(BIN) run pipelines/demo-depth.toml --no-progress
	@echo
	$(BIN) summarize out/demo-depth/

# Where apt-get exists, setup installed Chromium, so the browser test must not skip.
test: setup
	if command -v apt-get >/dev/null; then export DTTA_REQUIRE_BROWSER=1; fi; \
	$(CARGO) test --release -- --test-threads=2

# Every method over the same samples (pipelines/robustness-eval.toml), one output per
# method, then one table over all of them and the HTML report (out/robustness/report.html).
EVAL_OUT := out/robustness
# The settings chosen on validation digits (README, "Cost and accuracy"; tools/tune_dusa.sh).
EVAL_ADAPTIVE := --set tta.budget.skip_conf=0.9
EVAL_DUSA_ONLINE := --set tta.method=dusa --set tta.mode=online --set runtime.batch_size=8 --set tta.dusa.lr=1e-4
EVAL_DUSA_EPISODIC := --set tta.method=dusa --set tta.dusa.steps=3 --set tta.dusa.lr=1e-4
# EATA and SAR at the authors' settings (tools/tune_online.sh: on validation digits every
# setting tried was within 0.1 points); EATA's Fisher information from 100 clean
# VALIDATION digits, never the test digits.
EVAL_FISHER := out/robustness-fisher/shard-000000.tar
EVAL_EATA := --set tta.method=eata --set tta.eata.fisher_url=$(EVAL_FISHER) --set tta.eata.fisher_samples=100
eval: eval-classification eval-dense

eval-classification: build
	rm -rf $(EVAL_OUT)
	for method in source tent diffusion-classifier diffusion-tta; do \
	  $(BIN) run pipelines/robustness-eval.toml --no-progress \
	    --set tta.method=$$method --set output.url=$(EVAL_OUT)/$$method/ || exit 1; \
	done
	$(BIN) run pipelines/robustness-eval.toml --no-progress \
	  --set tta.mode=online --set output.url=$(EVAL_OUT)/diffusion-tta-online/
	$(BIN) run pipelines/robustness-eval.toml --no-progress $(EVAL_ADAPTIVE) \
	  --set output.url=$(EVAL_OUT)/diffusion-tta-adaptive/
	$(BIN) run pipelines/robustness-eval.toml --no-progress $(EVAL_DUSA_ONLINE) \
	  --set output.url=$(EVAL_OUT)/dusa-online/
	$(BIN) run pipelines/robustness-eval.toml --no-progress $(EVAL_DUSA_EPISODIC) $(EVAL_ADAPTIVE) \
	  --set output.url=$(EVAL_OUT)/dusa-adaptive/
	rm -rf out/robustness-fisher
	$(PY) tools/make_demo_shards.py out/robustness-fisher --split validation --shards 1 >/dev/null
	$(BIN) run pipelines/robustness-eval.toml --no-progress $(EVAL_EATA) --set output.url=$(EVAL_OUT)/eata/
	$(BIN) run pipelines/robustness-eval.toml --no-progress --set tta.method=sar --set output.url=$(EVAL_OUT)/sar/
	# The continual protocol: one stream through the 15 corruptions, never reset.
	$(BIN) run pipelines/robustness-eval.toml --no-progress --set tta.method=tent --set protocol.kind=continual \
	  --set output.url=$(EVAL_OUT)/tent-continual/
	$(BIN) run pipelines/robustness-eval.toml --no-progress $(EVAL_EATA) --set protocol.kind=continual \
	  --set output.url=$(EVAL_OUT)/eata-continual/
	$(BIN) run pipelines/robustness-eval.toml --no-progress --set tta.method=sar --set protocol.kind=continual \
	  --set output.url=$(EVAL_OUT)/sar-continual/
	@echo
	$(BIN) summarize $(EVAL_OUT)/
	$(BIN) report $(EVAL_OUT)/ -o $(EVAL_OUT)/report.html

# The dense tables (pipelines/robustness-eval-seg.toml, -depth.toml): 100 test scenes per
# task, clean and under the 15 corruptions at severity 3, one output per method, one
# table per task (dataset-level mIoU, or AbsRel) and one HTML report per task.
# DUSA's setting for the segmenter, chosen on validation scenes (README, "Dense evaluation";
# tools/tune_dusa.sh): lr 1e-5, the only setting that did not lose there.
EVAL_DENSE_DUSA := --set tta.method=dusa --set tta.mode=online --set runtime.batch_size=8 --set tta.dusa.lr=1e-5
eval-dense: build
	rm -rf out/robustness-seg out/robustness-depth
	for method in source tent diffusion-tta; do \
	  $(BIN) run pipelines/robustness-eval-seg.toml --no-progress \
	    --set tta.method=$$method --set output.url=out/robustness-seg/$$method/ || exit 1; \
	done
	$(BIN) run pipelines/robustness-eval-seg.toml --no-progress $(EVAL_DENSE_DUSA) \
	  --set output.url=out/robustness-seg/dusa-online/
	for method in source diffusion-tta; do \
	  $(BIN) run pipelines/robustness-eval-depth.toml --no-progress \
	    --set tta.method=$$method --set output.url=out/robustness-depth/$$method/ || exit 1; \
	done
	@echo
	$(BIN) summarize out/robustness-seg/
	@echo
	$(BIN) summarize out/robustness-depth/
	$(BIN) report out/robustness-seg/ -o out/robustness-seg/report.html
	$(BIN) report out/robustness-depth/ -o out/robustness-depth/report.html

bench: build
	bench/run.sh

fmt:
	cargo fmt --all

clean:
	$(CARGO) clean
	rm -rf out

# Diffusion-TTA seconds per image, dtta against the Python reference loop, at real size on
# a GPU (bench/gpu.sh: random-weight ConvNeXt-Tiny + DiT-XL/2 + SD VAE encoder, under
# 8 minutes on an H100). BENCH_ARGS=--tiny runs the same script at tiny sizes on a CPU.
.PHONY: bench-gpu
bench-gpu: build
	bench/gpu.sh $(BENCH_ARGS)
