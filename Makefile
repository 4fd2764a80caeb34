# Two commands on a fresh machine: `make lab` (the notebooks) and `make test` (the whole suite).
# Both create .venv, install the project and prepare the default data the first time, and
# are quick the second time (a stamp file remembers the install).
#
# torch comes from TORCH_SPEC, installed before everything else, so that you choose the build:
#   make lab TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu121"   # a GPU laptop
#   make test TORCH_SPEC="torch==2.13.0"                                             # CI: CPU wheel
# Everything else is pinned by constraints.txt so that stored notebook outputs do not drift.

PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA_STAMP := data/.prepared
NOTEBOOKS := $(sort $(wildcard notebooks/*.ipynb))
# the same environment for nbconvert (regenerating) and nbval (checking)
NB_ENV := PYTHONHASHSEED=0

.PHONY: install data lab test unit nbval notebooks lint bench constraints clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The default corpus, tokenizer and train/val tensors (cached under data/; a re-run reuses them).
$(DATA_STAMP): $(STAMP)
	$(PY) -m lowvram.data --preset cpu-demo
	touch $(DATA_STAMP)

data: $(DATA_STAMP)

lab: install data
	cd notebooks && ../$(VENV)/bin/jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root)

lint: install
	$(PY) -m ruff check .

# The whole suite: lint, unit tests, and strict nbval over every notebook (one pytest run).
test: install data lint
	$(NB_ENV) $(PY) -m pytest tests $(NOTEBOOKS) \
		$(if $(NOTEBOOKS),--nbval --nbval-current-env --nbval-sanitize-with notebooks/sanitize.cfg)

unit: install
	$(PY) -m pytest tests

# Regenerate every stored notebook output in nbval's kernel settings: nbval's kernel does not
# capture fd-level output, so the stored outputs must be made without it too.
notebooks: install data
	cd notebooks && for nb in $(notdir $(NOTEBOOKS)); do \
		echo "== $$nb"; \
		$(NB_ENV) ../$(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace \
			--ExecutePreprocessor.timeout=900 \
			--ExecutePreprocessor.record_timing=False \
			--ExecutePreprocessor.extra_arguments="['--IPKernelApp.capture_fd_output=False']" \
			$$nb || exit 1; \
	done

# Benchmarks (developer tooling) into the README; the notebooks under the same NB_ENV as `test`.
bench: install data
	$(NB_ENV) $(PY) -m lowvram._bench --write-readme

# Re-pin the exact versions CI uses (torch excluded: it follows TORCH_SPEC).
constraints: install
	{ sed -n '1,3p' constraints.txt; $(PY) -m pip freeze --exclude-editable \
		| grep -viE '^(torch|lowvram|pip|setuptools|nvidia-|triton)([=<> ]|$$)'; } > constraints.new
	mv constraints.new constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
