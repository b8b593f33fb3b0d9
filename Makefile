# Set-up and entry points of speechbrain-meta. `make demo` and `make test` do all set-up.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA ?= data
RESULTS ?= results

.PHONY: setup system-deps test demo lint clean

setup: system-deps $(VENV)/.installed

system-deps:
	@bash tools/system_deps.sh

$(VENV)/.installed: setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,plot]"
	touch $@

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q

demo: setup
	$(PY) -m recipes.embedded_corpus.prepare --size demo --data_folder $(DATA)/embedded --download_folder $(DATA)/downloads

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf $(RESULTS)
