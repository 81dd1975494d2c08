# Two commands on a fresh machine: `make train` and `make test`.
# Both install what is missing first (launch/install.sh; a second run does nothing).
VENV   := .venv
PYTHON := $(VENV)/bin/python
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: install train test lint bench clean

install:
	@bash launch/install.sh

# The embedded default job (digits) on two Horovod workers on the CPU (Gloo).
train: install
	@bash launch/horovod.sh 2 --workdir=runs/digits-$$(date +%Y%m%d-%H%M%S)

test: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest tests

bench: install
	$(PYTHON) -m bench.losses
	$(PYTHON) -m bench.cross_replica
	$(PYTHON) -m bench.fit
	$(PYTHON) -m bench.elastic
	$(PYTHON) -m bench.scale
	$(PYTHON) -m bench.quality

clean:
	rm -rf $(VENV) runs .pytest_cache
