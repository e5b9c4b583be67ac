VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo

.PHONY: demo test install

$(PY):
	python3 -m venv $(VENV)

# Reinstall only when the project metadata changes; DeepSpeed is installed without compiling ops.
# The demo needs only the package and matplotlib (its curves.png); the tests need the dev extras
# (pytest, the trackers, peft, datasets), which include the demo's.
$(DEMO_STAMP): pyproject.toml | $(PY)
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e ".[demo]"
	touch $@

$(STAMP): pyproject.toml | $(PY)
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e ".[dev]"
	touch $@ $(DEMO_STAMP)

install: $(STAMP)

demo: $(DEMO_STAMP)
	$(PY) examples/toy_pathology.py --output-dir runs/toy

test: $(STAMP)
	$(PY) -m pytest tests
