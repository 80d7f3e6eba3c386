# Fresh machine: `make demo` or `make test` create .venv, install torch==2.13.0 first (the CPU build
# on local disk), then millis with its test extras, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded default model (all-MiniLM-L6-v2, real weights).
demo: $(STAMP)
	$(VENV)/bin/millis optimize builtin:minilm --task embed --out artifacts/minilm
	$(VENV)/bin/millis info artifacts/minilm
	$(VENV)/bin/millis predict artifacts/minilm "where is my card?" "I lost my card yesterday"

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	bash bench/peers/setup.sh
	$(PY) bench/cpu_encoders.py

clean:
	rm -rf $(VENV) artifacts
