# ISLE Workbench. `make demo`: install, run CAM, CAM -> dCRF and their ISLE ensemble on the
# bundled train split while serving the app. `make test`: install (with Chromium for the browser test) and run the tests.
PY := .venv/bin/python
PORT ?= 8501
# The address the app listens on: this machine only unless told otherwise (ADDRESS=0.0.0.0: every interface).
ADDRESS ?= 127.0.0.1

.PHONY: install browser demo app worker stop-worker test

.venv/installed: requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install -r requirements.txt
	touch $@

install: .venv/installed

# Debian's Chromium and its driver for the headless browser test (root: apt-get directly).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver; }

# The app serves while the worker runs the jobs in the foreground: CAM, CAM -> dCRF, then the
# ISLE ensemble of the two (exact merge + naive baseline). Then a worker is left running in the
# background for the jobs queued from the app; Ctrl-C stops the app, `make stop-worker` the worker.
demo: install
	$(PY) -m streamlit run app.py --server.headless true --server.address $(ADDRESS) --server.port $(PORT) & \
	$(PY) -m engine run cam dcrf && $(PY) -m engine isle --name auto --naive; \
	$(PY) -m engine worker --detach; \
	echo "App: http://$(ADDRESS):$(PORT)  (Ctrl-C to stop the app; make stop-worker to stop the worker)"; wait

# The app starts a worker for its cache when none is alive (ISLE_WORKER=off: it does not).
app: install
	$(PY) -m streamlit run app.py --server.headless true --server.address $(ADDRESS) --server.port $(PORT)

worker: install
	$(PY) -m engine worker --progress

stop-worker: install
	$(PY) -m engine worker --stop

test: install browser
	$(PY) -m pytest -q
