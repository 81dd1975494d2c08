# Two commands on a fresh machine: `make train` and `make test`.
# Both install what is missing first (launch/install.sh; a second run does nothing).
VENV   := .venv
PYTHON := $(VENV)/bin/python
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: install train test docs bench clean

install:
	@bash launch/install.sh

# The embedded default job (digits) on two Horovod workers on the CPU (Gloo).
train: install
	@bash launch/horovod.sh 2 --workdir=runs/digits-$$(date +%Y%m%d-%H%M%S)

# Most tests wait on the jobs they start (TensorFlow's import, Horovod's start-up), so two
# pytest workers overlap them: 28 -> 20.5 minutes on 2 cores. --dist loadfile keeps each
# file on one worker, so a module's fixture (a job on every backend) runs once.
TEST_WORKERS ?= 2

# The documentation site (docs/, the README as its front page): built strictly, so a
# broken link or page fails the tests; tests/test_docs.py runs its Python blocks.
export NO_MKDOCS_2_WARNING := 1
MKDOCS := $(VENV)/bin/mkdocs

test: install
	$(PYTHON) -m ruff check .
	$(MKDOCS) build --strict --quiet
	$(PYTHON) -m pytest -n $(TEST_WORKERS) --dist loadfile tests

# Serves the site at http://127.0.0.1:8000, rebuilt on every edit.
docs: install
	$(MKDOCS) serve

bench: install
	$(PYTHON) -m bench.losses
	$(PYTHON) -m bench.cross_replica
	$(PYTHON) -m bench.fit
	$(PYTHON) -m bench.elastic
	$(PYTHON) -m bench.scale
	$(PYTHON) -m bench.pipeline
	$(PYTHON) -m bench.step
	$(PYTHON) -m bench.quality
	$(PYTHON) -m bench.real
	$(PYTHON) -m bench.centres
	$(PYTHON) -m bench.protocols

clean:
	rm -rf $(VENV) runs site .pytest_cache
