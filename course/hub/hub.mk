# The course hub and the browser tests. Included by the Makefile (`include course/hub/hub.mk`);
# uses its PY and `install`. Needs root (apt-get, Unix users, a hub that spawns as them).
#
#   make hub            JupyterHub on http://127.0.0.1:$(HUB_PORT) with the demo users
#                       instructor, student1, student2 (password: $(HUB_PASSWORD))
#   make browser-deps   Debian's chromium, playwright (pip, into .venv), the hub's venv,
#                       proxy, demo users and exchange (course/hub/setup.sh --users)
#   make hub-publish    after editing course/hub/published.txt: rebuild what students may
#                       import (setup.sh without --users; prints what stays hidden)
#   make test-browser   the browser tests (tests/browser/, with test_hub_attacks.py),
#                       screenshots in .artifacts/browser/
HUB_PREFIX ?= /opt/llmopt-hub
HUB_PORT ?= 8000
HUB_PASSWORD ?= llmopt-demo
PLAYWRIGHT_VERSION ?= 1.65.2

.PHONY: hub hub-setup hub-publish browser-deps test-browser

hub-setup:
	@test "$$(id -u)" = 0 || { echo "make hub needs root (it creates Unix users and spawns servers as them)" >&2; exit 1; }
	LLMOPT_HUB_PREFIX=$(HUB_PREFIX) bash course/hub/setup.sh --users

hub-publish:
	@test "$$(id -u)" = 0 || { echo "make hub-publish needs root (it writes $(HUB_PREFIX))" >&2; exit 1; }
	LLMOPT_HUB_PREFIX=$(HUB_PREFIX) bash course/hub/setup.sh

hub: hub-setup
	@echo "JupyterHub on http://127.0.0.1:$(HUB_PORT)/  users: instructor, student1, student2  password: $(HUB_PASSWORD)"
	LLMOPT_HUB_PREFIX=$(HUB_PREFIX) LLMOPT_HUB_PORT=$(HUB_PORT) LLMOPT_HUB_PASSWORD=$(HUB_PASSWORD) \
	  $(HUB_PREFIX)/venv/bin/jupyterhub -f course/hub/jupyterhub_config.py

# Debian's Chromium (never a browser download: playwright launches /usr/bin/chromium).
browser-deps: install hub-setup
	@command -v chromium >/dev/null || { echo "apt-get install chromium"; apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	@$(PY) -c "import playwright" 2>/dev/null || $(PY) -m pip install -q "playwright==$(PLAYWRIGHT_VERSION)"

test-browser: browser-deps
	$(PY) -m pytest -c tests/browser/pytest.ini tests/browser
