VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install

$(PY):
	python3 -m venv $(VENV)

# Reinstall only when the project metadata changes; DeepSpeed is installed without compiling ops.
$(STAMP): pyproject.toml | $(PY)
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/toy_pathology.py --output-dir runs/toy

test: $(STAMP)
	$(PY) -m pytest tests
