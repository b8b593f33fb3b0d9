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
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,plot,ssl,lm]"
	touch $@

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2

# The whole story on a 2-core CPU (docs/adaptation.md): embedded corpus, MAML and
# multitask training, adaptation of MAML, multitask and random initialisations
# to the held-out languages, then $(RESULTS)/demo/{adaptation.csv,report.md,*.png}.
# A rerun reuses the finished stages.
demo: setup
	$(PY) evaluate_adaptation.py hparams/protocol_demo.yaml --data_folder $(DATA)/embedded --download_folder $(DATA)/downloads --output_folder $(RESULTS)/demo

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf $(RESULTS)
