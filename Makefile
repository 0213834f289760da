# modelbus: `make run` and `make test` each do the whole set-up on a fresh machine.
PY ?= python3.11
VENV ?= .venv
# GPU users: make install TORCH_SPEC='torch==2.13.0 --index-url <a CUDA wheel index>'
TORCH_SPEC ?= torch==2.13.0
# test processes (pytest-xdist): every test has its own Redis namespace, root and ports
TEST_JOBS ?= 2
BIN := $(VENV)/bin
STAMP := $(VENV)/.modelbus-installed

# Upscalers (Spandrel) need torchvision, and PyPI's torchvision does not import beside the CPU torch 2.13.0
# build: a second venv holds the CUDA build of torch 2.14.1 with its torchvision (5.6 GB, about a minute
# from this machine's disk) and Spandrel, and reaches everything else (the project included) in .venv
VISION_VENV ?= .venv-vision
VISION_SPEC ?= torch==2.14.1 torchvision==0.29.1 spandrel==0.4.2
VISION_STAMP := $(VISION_VENV)/.modelbus-installed

.PHONY: install run test bench lint clean install-upscalers test-upscalers

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	# setuptools warns once per data folder (services/configs, the page's static files) that it ships as
	# package data; tests/test_packaging.py checks the wheel holds them, so the wall of warnings is muted
	PYTHONWARNINGS=ignore $(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

$(VISION_STAMP): $(STAMP)
	rm -rf $(VISION_VENV)
	$(PY) -m venv $(VISION_VENV)
	$(VISION_VENV)/bin/python -m pip install -q $(VISION_SPEC)
	# its own packages come first on sys.path, then .venv's (a site dir added by this .pth)
	$(BIN)/python -c "import sysconfig; print('import site; site.addsitedir(%r)' % sysconfig.get_paths()['purelib'])" \
		> "$$($(VISION_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/zz_modelbus_venv.pth"
	$(VISION_VENV)/bin/python -c "import spandrel, torchvision, modelbus.services.load"
	touch $(VISION_STAMP)

install-upscalers: $(VISION_STAMP)

run: install
	$(BIN)/modelbus up

test: install
	$(BIN)/python -m pytest -q -n $(TEST_JOBS) tests --ignore=tests/bench

# the tests that need Spandrel (they skip in .venv): identification checked against Spandrel's own, loads,
# an upscale, a GPU worker of this venv loading one through the queue
test-upscalers: install-upscalers
	$(VISION_VENV)/bin/python -m pytest -q tests/upscalers

bench: install
	$(BIN)/python tests/bench/run_all.py

lint: install
	$(BIN)/ruff check events services workers tests
	# by their installed names (modelbus.*: .typecheck/modelbus links the top folders; pyproject's mypy_path)
	$(BIN)/mypy -p modelbus.events -p modelbus.services -p modelbus.workers
	$(BIN)/mypy --strict -p modelbus.events

clean:
	rm -rf $(VENV) $(VISION_VENV) .pytest_cache .mypy_cache .ruff_cache
