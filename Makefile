# minijamba — every target installs what it needs through `setup` (a .venv keyed on the pinned requirements).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The stamp changes whenever pyproject.toml or requirements.txt does, so `setup` re-runs exactly then.
STAMP  := $(VENV)/.setup-$(shell cat pyproject.toml requirements.txt | sha256sum | cut -c1-16)
# Headless targets draw with Agg; `make lab` leaves the backend to Jupyter, so figures show inline.
HEADLESS := MPLBACKEND=Agg

.DEFAULT_GOAL := help
.PHONY: help setup test lint format lessons student lab figures train sample data-full bench cuda-check clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

setup: $(STAMP) ## create .venv and install the pinned dependencies (skipped when up to date)

$(STAMP): pyproject.toml requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements.txt -e '.[test,lessons]'
	rm -f $(VENV)/.setup-*
	touch $@

lint: setup ## ruff lint and format check (package, tests, lessons)
	$(VENV)/bin/ruff check minijamba tests lessons
	$(VENV)/bin/ruff format --check minijamba tests lessons

format: setup ## apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix minijamba tests lessons
	$(VENV)/bin/ruff format minijamba tests lessons

test: lint ## lint, every test, every lesson (nbmake), then the student edition run top to bottom
	$(HEADLESS) $(PY) -m pytest tests
	$(HEADLESS) $(PY) -m pytest --nbmake --nbmake-timeout=600 --durations=0 lessons
	$(HEADLESS) $(PY) -m minijamba.student --execute

lessons: setup ## execute every lesson notebook (the teacher's edition, solutions graded), refreshing figures/
	$(HEADLESS) $(PY) -m pytest --nbmake --nbmake-timeout=600 --durations=0 lessons

student: setup ## write the student edition (every lesson, exercises blank, solutions removed) into student/
	$(PY) -m minijamba.student

lab: setup ## open lessons/ in JupyterLab, with this project's .venv as the kernel
	$(VENV)/bin/jupyter lab lessons $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

figures: lessons bench ## regenerate every figure: the lessons' and the benchmarks'

train: setup ## train a small Jamba on the bundled TinyStories (~20 min on 2 CPU cores), print stories
	$(PY) -m minijamba.train --model jamba --preset cpu20 --out_dir runs/jamba

sample: setup ## sample stories from the checkpoint `make train` wrote (runs/jamba)
	$(PY) -m minijamba.sample --ckpt runs/jamba

data-full: setup ## download the full TinyStories (~2 GB; needs a network) for `train --data full`
	$(PY) -m minijamba.download

bench: setup ## run the benchmarks, print their tables, write figures/bench_*.png (minutes)
	$(HEADLESS) $(PY) -m minijamba.bench scan
	$(HEADLESS) $(PY) -m minijamba.bench decode

# On a GPU machine, with a CUDA build of torch (a CPU-only torch cannot build the .cu: `make cuda-check` says so).
cuda-check: export CUDA_HOME ?= /usr/local/cuda
cuda-check: export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
cuda-check: setup ## on a GPU machine: build the CUDA extension, run CUDA tests and the GPU benchmark
	$(PY) -c "from minijamba import fused; print('built', fused.load('cuda').__file__)"
	$(PY) -m pytest tests/test_fused_scan.py -k "cuda" -rs
	$(PY) -m minijamba.bench scan --impls cuda,cpu,chunked --batch 8 --dim 2048 --lengths 1024,4096 --no-figure

clean: ## remove caches and build outputs (keeps .venv)
	rm -rf build .pytest_cache .hypothesis .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
