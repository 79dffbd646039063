# `make run` runs the quickstart recipe; `make test` runs lint and the test suite.
# Both create or reuse .venv; the install runs again only when the requirements change.
VENV := .venv
REQS := requirements/common.txt requirements/cpu.txt requirements/cuda.txt requirements/trackers.txt \
	pyproject.toml scripts/install.sh
STAMP := $(VENV)/.installed-$(shell cat $(REQS) | sha1sum | cut -c1-12)
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: run test install

install: $(STAMP)

$(STAMP): $(REQS)
	bash scripts/install.sh $(STAMP)

run: $(STAMP)
	$(VENV)/bin/online-dpo run recipes/quickstart.yaml $(ARGS)

# Two pytest workers, one torch thread each, a test file per worker at a time (its module fixtures
# stay in one process): on 2 cores this beats one process running 2 threads.
PYTEST_ARGS ?= -n 2 --dist loadfile

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)
