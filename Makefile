# LLM Optimization Labs — every workflow is a target. `make help` lists them.
SHELL := /bin/bash
PY_BASE ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PYTHONPATH := $(CURDIR)/lib:$(CURDIR)
LAB ?= lab01_kv_cache
SUBMISSIONS ?= .grading/demo-submissions
JOBS ?= 2

include course/hub/hub.mk

.PHONY: help install sandbox-deps demo lab labs grade model bench test loadtest clean

help:
	@echo "make install   create .venv and install everything (torch pinned to 2.13.0)"
	@echo "make demo      install, build labs/, grade three sample lab01 submissions, print the gradebook"
	@echo "make lab       open JupyterLab on labs/"
	@echo "make labs      regenerate labs/ (student release) from solutions/ with nbgrader"
	@echo "make grade     LAB=lab01_kv_cache SUBMISSIONS=folder -> grades.csv (+ nbgrader gradebook)"
	@echo "make model     train tiny-opt (GPU recommended) into lib/llmopt/assets/tiny-opt"
	@echo "make bench     run the GPU benchmarks into bench/results/"
	@echo "make test      install, then run every test (lib, autograder, notebooks through the grader, browser)"
	@echo "make loadtest  grade N=200 lab01 submissions (correct/wrong/hostile) twice + a serial sample -> bench/results/loadtest.json"
	@echo "make hub       JupyterHub with nbgrader on 127.0.0.1:8000 and demo users (root)"
	@echo "make test-browser  Playwright + Debian's Chromium against JupyterLab and the hub"

install: $(STAMP) sandbox-deps

# The grader runs every submission in a bubblewrap sandbox (Debian: bubblewrap).
sandbox-deps:
	@command -v bwrap >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get install -y -q bubblewrap >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q bubblewrap >/dev/null; }; \
	  else echo "warning: install bubblewrap (apt-get install bubblewrap) to grade untrusted notebooks"; fi; }

# torch is pinned in the same pip command as everything else: unpinned, pip would pull a
# multi-GB CUDA build. pyproject.toml holds the pins; environment.yml mirrors them.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PY_BASE) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 -e .
	touch $(STAMP)

labs: install
	$(PY) -m autograder release

demo: install labs
	$(PY) -m autograder demo --jobs $(JOBS)

lab: install
	$(VENV)/bin/jupyter lab --notebook-dir=labs $(if $(filter 0,$(shell id -u)),--allow-root,)

grade: install
	$(PY) -m autograder grade $(LAB) $(SUBMISSIONS) --out grades.csv --jobs $(JOBS)

model: install
	$(PY) -m llmopt.train --out lib/llmopt/assets/tiny-opt

bench: install
	$(PY) bench/kv_cache.py
	$(PY) bench/paged_attention.py
	$(PY) bench/flash_attention.py
	$(PY) bench/gptq.py
	$(PY) bench/memory_training.py
	$(PY) bench/zero.py
	$(PY) bench/moe.py
	$(PY) bench/int8_nf4.py --ppl
	$(PY) bench/serving.py
	$(PY) bench/lora.py
	$(PY) bench/compression.py

test: install
	$(PY) -m pytest -q -p no:cacheprovider
	$(MAKE) --no-print-directory test-browser

loadtest: install labs
	$(PY) -m autograder.loadtest --n $(or $(N),200) --jobs $(JOBS) $(if $(SERIAL),--serial-sample $(SERIAL),)

clean:
	rm -rf .grading .pytest_cache grades.csv .artifacts
