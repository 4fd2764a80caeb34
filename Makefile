# Two commands on a fresh machine: `make lab` (the notebooks) and `make test` (the whole suite).
# Both create .venv, install the project and prepare the default data the first time, and
# are quick the second time (a stamp file remembers the install).
#
# torch comes from TORCH_SPEC, installed before everything else, so that you choose the build:
#   make lab TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130"  # GPU
#   make test TORCH_SPEC="torch==2.13.0"                                             # CI: CPU wheel
# Everything else is pinned by constraints.txt so that stored notebook outputs do not drift.

PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA_STAMP := data/.prepared
NOTEBOOKS := $(sort $(wildcard notebooks/*.ipynb notebooks/solutions/*.ipynb))
# the same environment for nbconvert (regenerating), nbval (checking) and make bench; CUDA is
# hidden, so that on a GPU machine the stored (CPU) outputs are regenerated and checked as they
# were made (make test-gpu runs every notebook on CUDA)
NB_ENV := PYTHONHASHSEED=0 CUDA_VISIBLE_DEVICES=
# The test parts run side by side on few cores, next to whatever else the machine runs: idle
# OpenMP threads then must sleep, not spin (libgomp's default), or a thread that waits for a
# descheduled one burns the core that one needs (measured: a 10-step cpu-demo run took 97 s
# instead of 10 s on 2 busy cores). It changes how threads wait, not how work is split: results
# are bitwise the same. The tests record every memory step afresh: the planner's disk cache
# (lowvram/memory/_diskcache.py) is off in them.
TEST_ENV := $(NB_ENV) OMP_WAIT_POLICY=PASSIVE LOWVRAM_CACHE_DIR=off
NBVAL := --nbval --nbval-current-env --nbval-sanitize-with notebooks/sanitize.cfg
# Other learners' CPUs, emulated on this one (PyTorch's and oneDNN's kernel choice, threads):
# a laptop with no vector units, and an AVX2 laptop with more threads than this machine has.
# Each is set for its own subprocess only (env VAR=... command), never for the whole make.
CPU_sse41 := ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 OMP_NUM_THREADS=1
CPU_avx2 := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 OMP_NUM_THREADS=3
# test-portable's two passes run side by side (PORTABLE_JOBS at once), each in its own copy of
# notebooks/ under build/nbpass/ with data/ linked, so that they never share a runs/ folder.
PORTABLE_JOBS ?= 2
NBPASS := build/nbpass
# (the files only: no runs/ folder, which another pass may be writing while this one copies)
nbpass_copy = rm -rf $(NBPASS)/$(1) && mkdir -p $(NBPASS)/$(1)/notebooks/solutions \
	&& cp notebooks/*.* $(NBPASS)/$(1)/notebooks/ && cp notebooks/solutions/*.* $(NBPASS)/$(1)/notebooks/solutions/ \
	&& ln -s $(CURDIR)/data $(NBPASS)/$(1)/data
nbpass_notebooks = $(patsubst notebooks/%,$(NBPASS)/$(1)/notebooks/%,$(NOTEBOOKS))

.PHONY: install data lab test test-native native test-portable portable-sse41 portable-avx2 \
	test-gpu unit notebooks lint bench constraints clean

# constraints.txt pins versions (numpy 2.4, matplotlib 3.11, transformers 5.24, ...) that need
# Python 3.11+; the package itself also runs on 3.10 with pip's own choice of versions (README).
$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "make lab/test need 	Python 3.11 or newer (constraints.txt pins packages that need it): make PYTHON=python3.11 ..."; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The default corpus, tokenizer and train/val tensors (cached under data/; a re-run reuses them).
# re-run (a quick check) when the code that makes or checks the data changes
$(DATA_STAMP): $(STAMP) lowvram/data.py lowvram/_datacache.py lowvram/corpus.py
	$(PY) -m lowvram.data --preset cpu-demo
	touch $(DATA_STAMP)

data: $(DATA_STAMP)

# The memory planner's steps of the lesson's model (25_2's plan(), `--plan`), recorded once into
# its disk cache (~/.cache/lowvram/recordings), so that the notebook's plan takes a second, not
# ~25 s; again only when lowvram's code changes (the cache is keyed on it).
PLAN_STAMP := build/.plan-recorded
$(PLAN_STAMP): $(STAMP) $(wildcard lowvram/*.py lowvram/*/*.py)
	@echo "== recording the memory planner's steps of the rtx2050 model once (about a minute)"
	$(PY) -m lowvram.memory --preset rtx2050 --plan > /dev/null
	@mkdir -p build && touch $@

lab: install data $(PLAN_STAMP)
	cd notebooks && ../$(VENV)/bin/jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root)

lint: install
	$(PY) -m ruff check .

# The whole suite: lint, then side by side (TEST_JOBS at once, each part's output printed whole
# when it ends): unit tests and strict nbval over every notebook on this CPU; the notebooks again
# under each emulated CPU, the AVX2 pass with kernels as JupyterLab starts them (fd output
# captured: no stderr a stored cell lacks, tests/nbval_jupyterlab.py). Much of a
# notebook pass is one core waiting (kernel starts, imports, launched processes), so 2 cores
# finish these parts sooner together than one after the other.
TEST_JOBS ?= 2
test: install data lint
	@echo "== $(TEST_JOBS) at a time: unit tests + strict nbval (this CPU), strict nbval on two emulated CPUs (one with JupyterLab's fd capture)"
	@$(MAKE) --no-print-directory -j$(TEST_JOBS) --output-sync=target \
		native portable-sse41 portable-avx2

test-native: install data lint
	@$(MAKE) --no-print-directory native

# the parts below have no prerequisites: test, test-native and test-portable check the set-up
# once, before they start them (a sub-make does not inherit `make -o install`)
native:
	$(TEST_ENV) $(PY) -m pytest tests $(NOTEBOOKS) $(if $(NOTEBOOKS),$(NBVAL))

# Stored outputs must hold on every learner's CPU, not only on the one that stored them; and no
# notebook may show stderr in JupyterLab that its stored copy lacks. Each pass's output is printed
# whole when it ends (--output-sync); make fails if any pass fails.
test-portable: install data
	@echo "== $(PORTABLE_JOBS) at a time: strict nbval on two emulated CPUs (the AVX2 one with kernels as JupyterLab starts them)"
	@$(MAKE) --no-print-directory -j$(PORTABLE_JOBS) --output-sync=target \
		portable-sse41 portable-avx2

# each emulated CPU's variables are set for its own pytest process only (env VAR=... command).
# The AVX2 pass starts each kernel as JupyterLab does (tests/nbval_jupyterlab.py): it also sees
# what libraries write to file descriptor 2, and fails on any stderr a stored cell lacks.
NBVAL_KERNEL_sse41 := --nbval-current-env
NBVAL_KERNEL_avx2 := -p tests.nbval_jupyterlab --nbval-kernel-name lowvram-jupyterlab
portable-sse41 portable-avx2: portable-%:
	@$(call nbpass_copy,$*)
	@echo "== strict nbval as on another CPU: $(CPU_$*)$(if $(filter avx2,$*), (kernels started as JupyterLab starts them))"
	env $(CPU_$*) $(TEST_ENV) $(PY) -m pytest -q -p no:cacheprovider $(NBVAL_KERNEL_$*) \
		$(call nbpass_notebooks,$*) --nbval --nbval-sanitize-with notebooks/sanitize.cfg

unit: install
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest tests

# The checks that need a CUDA GPU, bounded (< 6 min on a large GPU), each part going on past a
# failing one: pytest -m gpu, every notebook executed on CUDA, each plan row that fits trained
# 2 steps under a 4 GiB cap, the GPU bench. Results in $$OUT if set, else build/gpu/. Without an
# NVIDIA GPU it says "skipped" and exits 0. On the lent machine: make -o install -o data
# test-gpu PY=python3 (../shared/gpu-check.sh prepares the call); GPU_BUDGET=seconds in all.
GPU_BUDGET ?= 400
test-gpu: install data
	PYTHONHASHSEED=0 $(PY) tests/gpu_suite.py --budget $(GPU_BUDGET)

# Regenerate every stored notebook output, in nbval's kernel settings: nbval's kernel does not
# forward output written straight to the process's file descriptors, so neither may this one.
notebooks: install data
	for nb in $(NOTEBOOKS); do \
		echo "== $$nb"; \
		$(NB_ENV) $(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace \
			--ExecutePreprocessor.timeout=900 \
			--ExecutePreprocessor.record_timing=False \
			--ExecutePreprocessor.extra_arguments="['--IPKernelApp.capture_fd_output=False']" \
			$$nb || exit 1; \
	done

# Benchmarks (developer tooling) into the README; the notebooks under the same NB_ENV as `test`.
bench: install data
	$(NB_ENV) $(PY) -m lowvram._bench --write-readme
	$(PY) -m lowvram._bench --gpu --write-readme

# Re-pin the exact versions CI uses (torch excluded: it follows TORCH_SPEC).
constraints: install
	{ sed -n '1,3p' constraints.txt; $(PY) -m pip freeze --exclude-editable \
		| grep -viE '^(torch|lowvram|pip|setuptools|nvidia-|triton)([=<> ]|$$)'; } > constraints.new
	mv constraints.new constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache $(NBPASS) $(PLAN_STAMP)
