# make demo   extract features from the bundled clips (local Ray, local storage, CPU)
# make test   the whole test suite, slow tests included (starts its own Ray and a moto S3 server on loopback;
#             installs Debian's chromium and fonts-noto-cjk for the report's browser tests when they are missing)
# make test-fast   the inner loop: everything but the slow tests
# Each target creates its virtual environment on first use.

PYTHON ?= python3
VENV := .venv
MOTO_VENV := .venv-moto
export RAY_AUTH_MODE ?= disabled
# two pytest processes, each module in one of them (tests/conftest.py)
PROCESSES := -n 2 --dist loadgroup

.PHONY: demo test test-fast test-slow bench lint clean browser

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv --clear $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test,bench]'
	touch $@

# moto lives in its own environment: its botocore clashes with the one s3fs's aiobotocore pins.
$(MOTO_VENV)/.installed:
	$(PYTHON) -m venv --clear $(MOTO_VENV)
	$(MOTO_VENV)/bin/pip install --quiet 'moto[server]>=5,<6'
	touch $@

# Debian's Chromium: tests/test_report.py opens the HTML report in it, headless (installed once, as root like CI);
# and Debian's Noto CJK fonts, which draw label_3396.txt's Chinese names (without them Chromium draws boxes).
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)
	@fc-list :lang=zh family | grep -q "Noto Sans CJK" || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-noto-cjk)

demo: $(VENV)/.installed
	$(VENV)/bin/python jobs/extract.py --config configs/demo.yaml --filelist examples/demo.list --save_dir data/demo

test: $(VENV)/.installed $(MOTO_VENV)/.installed browser
	VTP_MOTO_SERVER=$(abspath $(MOTO_VENV))/bin/moto_server $(VENV)/bin/python -m pytest tests $(PROCESSES)

test-fast: $(VENV)/.installed $(MOTO_VENV)/.installed browser
	VTP_MOTO_SERVER=$(abspath $(MOTO_VENV))/bin/moto_server $(VENV)/bin/python -m pytest tests $(PROCESSES) -m "not slow"

test-slow: $(VENV)/.installed $(MOTO_VENV)/.installed
	VTP_MOTO_SERVER=$(abspath $(MOTO_VENV))/bin/moto_server $(VENV)/bin/python -m pytest tests -m slow

bench: $(VENV)/.installed
	$(VENV)/bin/python benchmarks/extract.py

lint: $(VENV)/.installed
	$(VENV)/bin/pip install --quiet ruff
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) $(MOTO_VENV) data/demo
