# Two entry points, each doing all of its own set-up on a fresh machine:
#   make table   venv + install + datasets, then re-measure every shipped model against the papers
#   make test    venv + install + datasets, then unit tests and the notebooks in smoke mode (nbval)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
export ELASTICTRAIN_DATA ?= $(CURDIR)/data

.PHONY: table test data install
install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

# Offline machines with ../shared/data get the official files materialised; elsewhere torchvision
# downloads them (md5-checked) on first use.
data: install
	@if [ -x ../shared/data/prepare ]; then ../shared/data/prepare "$(ELASTICTRAIN_DATA)" cifar10 mnist; \
	else $(BIN)/python -c "from elastictrain.data import load_split; [load_split(d, t) for d in ('cifar10', 'mnist') for t in (True, False)]"; fi

table: data
	$(BIN)/python -m elastictrain table

# CI unset: notebooks still take their smoke path (a few CPU steps), never a full GPU reproduction.
test: data
	CI=$${CI:-1} $(BIN)/python -m pytest --nbval tests/ notebooks/
