# The two commands: `make run` and `make test` (both set up .venv first).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test durations bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[cpu,test,plot]'
	touch $(STAMP)

# Trains the default model (cnn) on the embedded digits set from scratch.
run: $(STAMP)
	rm -rf runs/make_run
	$(BIN)/python -m trainer.main --model_dir=runs/make_run

# Two workers take whole files, longest first (tests/durations.json).
PYTEST := $(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

test: $(STAMP)
	$(PYTEST) --durations=25

# The suite as `make test` runs it, writing each file's seconds to
# tests/durations.json (what `make test` orders the files by).
durations: $(STAMP)
	TRAINER_WRITE_DURATIONS=tests/durations.json $(PYTEST)

bench: $(STAMP)
	$(BIN)/python -m bench.run
	$(BIN)/python -m bench.data_scaling table --sizes=50000,200000,400000

clean:
	rm -rf $(VENV) runs build *.egg-info
