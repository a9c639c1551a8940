# minijamba — every target installs what it needs through `setup` (a .venv keyed on the pinned requirements).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The stamp changes whenever pyproject.toml or requirements.txt does, so `setup` re-runs exactly then.
STAMP  := $(VENV)/.setup-$(shell cat pyproject.toml requirements.txt | sha256sum | cut -c1-16)
# Headless targets draw with Agg; `make lab` leaves the backend to Jupyter, so figures show inline.
HEADLESS := MPLBACKEND=Agg

.DEFAULT_GOAL := help
.PHONY: help setup test lint format lessons student lab figures train sample data-full bench cuda-check cuda-check-deps cuda-emulated-asan clean

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
	$(HEADLESS) $(PY) -m pytest --durations=15 tests
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
	$(HEADLESS) $(PY) -m minijamba.bench step

# On a GPU machine whose Python already has a CUDA torch (the lent ones have no network), installing nothing: PYTHON
# names that Python (python3 by default), run with this repository on PYTHONPATH, and build/cuda-check-deps too where
# that folder exists (`make cuda-check-deps` fills it on a machine with a network, to be copied over). The first
# step says what that Python lacks; the architectures are the visible GPU's (TORCH_CUDA_ARCH_LIST, if set, wins).
CUDA_DEPS := build/cuda-check-deps
CUDA_RUN  := env PYTHONPATH=$(CURDIR)$(if $(wildcard $(CUDA_DEPS)),:$(CURDIR)/$(CUDA_DEPS))$(if $(PYTHONPATH),:$(PYTHONPATH)) \
	$(HEADLESS) $(PYTHON)
# The Python that `make cuda-check-deps` prepares for, on x86-64 Linux (the lent GPU machines have 3.12): hypothesis
# ships compiled code, so the folder fits that Python version only.
CUDA_DEPS_PYTHON ?= 3.12

cuda-check: ## on a GPU machine, installing nothing (PYTHON=...): build, CUDA tests, compute-sanitizer, benchmark
	@$(CUDA_RUN) -c "import torch" 2>/dev/null || { echo "make cuda-check: $(PYTHON) cannot import torch;" \
		"name the Python that has a CUDA torch: make cuda-check PYTHON=..."; exit 1; }
	$(CUDA_RUN) -m minijamba.bench.cuda_check preflight
	$(CUDA_RUN) -m minijamba.bench.cuda_check build
	$(CUDA_RUN) -m pytest tests/test_fused_scan.py tests/test_cuda_build.py -k "cuda and not emulated" -rsP
	$(CUDA_RUN) -m minijamba.bench.cuda_check sanitize
	$(CUDA_RUN) -m minijamba.bench scan --impls cuda,cpu,chunked --batch 8 --dim 2048 --lengths 1024,4096 --no-figure

cuda-check-deps: setup ## put pinned pytest and hypothesis for CUDA_DEPS_PYTHON in build/cuda-check-deps
	rm -rf $(CUDA_DEPS)
	$(PY) -m pip install --quiet --no-compile --target $(CUDA_DEPS) --python-version $(CUDA_DEPS_PYTHON) \
		--only-binary=:all: -c requirements.txt pytest hypothesis
	@echo "$(CUDA_DEPS): $$(du -sh $(CUDA_DEPS) | cut -f1); copy it into the checkout on the GPU machine"

# The emulator (cuda/emulator/) and the kernels it runs built with AddressSanitizer and UBSan, under build names of
# their own (the plain builds stay cached), and the emulated tests run on them. libasan must be the process's first
# library, so it is preloaded into Python, with libstdc++ (or ASan cannot find the C++ exception machinery it
# wraps: Python itself does not load it); Python's own allocations are not ours to check (no leak report).
# --capture=sys: a sanitizer's report goes to the terminal, not into pytest's capture, lost when it aborts.
ASAN_RUN := MINIJAMBA_SANITIZE=address,undefined \
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" \
	ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1 $(HEADLESS) $(PY)

cuda-emulated-asan: setup ## the emulated CUDA kernels and their tests under AddressSanitizer + UBSan
	$(ASAN_RUN) -m pytest --capture=sys tests/test_cuda_emulator.py
	$(ASAN_RUN) -m pytest --capture=sys tests/test_fused_scan.py -k emulated

clean: ## remove caches and build outputs (keeps .venv)
	rm -rf build .pytest_cache .hypothesis .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
