# Two commands set everything up on a fresh machine: `make test` and `make demo`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fxslim-installed

.PHONY: test demo bench venv clean browser screenshot

venv: $(STAMP)

# torch/torchvision first and pinned, so pip takes the local wheels and never a newer CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev,onednn]'
	touch $(STAMP)

# worksteal: an idle worker takes queued tests from the busy one, so a minute-long compile test
# at the end of one worker's queue does not leave the other idle
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist worksteal

demo: $(STAMP)
	$(VENV)/bin/fxslim demo

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

# Debian's chromium for tests/test_html_render.py (skipped without it) and the screenshot below.
browser:
	apt-get update -qq && apt-get install -y -qq chromium

CHROMIUM := chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
	--disable-background-networking --disable-component-update --disable-sync

# docs/report.png, the HTML report README shows, rendered at 1000 px.
screenshot: $(STAMP)
	$(VENV)/bin/fxslim report torchvision:mobilenet_v2 --input 1x3x224x224 --passes haste:L=14 \
		--format html --out build/report.html
	$(CHROMIUM) --user-data-dir=build/chromium --window-size=1000,1400 --hide-scrollbars \
		--screenshot=docs/report.png file://$(CURDIR)/build/report.html

clean:
	rm -rf $(VENV) build *.egg-info
