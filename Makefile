# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo demo-local test test-slow bench bench-train bench-gpu clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# Fetch trex_star (official URL, or the mirror in TREX_HUB_BASE_URL), extract features of the
# sample photos and print their cosine similarities.
demo: install
	$(PY) examples/demo.py

# The same job against a mirror on 127.0.0.1 serving generated (random) weights in the released
# format: for machines without internet.
demo-local: install
	$(PY) examples/local_mirror.py --run "$(PY) examples/demo.py"

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m "slow"

bench: install
	$(PY) benchmarks/extract_bench.py

# Training throughput: the naive supervised loop against trex-train's presets (small on CPU, the
# issue's H100 setting on CUDA); the table goes into docs/benchmarks.md ("Training").
bench-train: install
	$(PY) benchmarks/train_bench.py --write-docs docs/benchmarks.md

# trex-extract against the naive DataLoader loop on a CUDA GPU (>= 10,000 JPEGs, whole processes,
# fp32 / fp16, model-only); writes its section of docs/benchmarks.md. Refuses without CUDA.
bench-gpu: install
	$(PY) benchmarks/extract_gpu_bench.py

clean:
	rm -rf build dist *.egg-info .pytest_cache
