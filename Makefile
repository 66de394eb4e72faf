# Two commands do all the set-up on a fresh machine:
#   make app    -> virtualenv + requirements + demo project, then the Streamlit app
#   make test   -> virtualenv + requirements (+ Chromium and wordnet-base, when root), then pytest
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO ?= projects/demo
PORT ?= 8501
# Loopback only; a team server keeps this and puts a sign-in proxy in front (docs/deploy.md).
ADDRESS ?= 127.0.0.1

.PHONY: install app demo test bench-embed lint system-deps

$(VENV)/.installed: requirements.txt requirements-ray.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-ray.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m bgminer demo $(DEMO)

app: demo
	BGMINER_PROJECT=$(DEMO) $(VENV)/bin/streamlit run app.py --server.address $(ADDRESS) --server.port $(PORT) --server.headless true

# Chromium + chromedriver for the browser end-to-end test (Debian packages; needs root).
# WordNet 3.0 (wordnet-base) for the test that rebuilds the committed hypernym table (scripts/build_wordnet_table.py).
system-deps:
	@if [ ! -x /usr/bin/chromium ] || [ ! -f /usr/share/wordnet/data.noun ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver wordnet-base; \
	  else echo "note: chromium or wordnet-base missing and not root: the browser and WordNet-table tests will be skipped"; fi; fi

test: install system-deps
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check bgminer tests bench scripts app_pages app.py
