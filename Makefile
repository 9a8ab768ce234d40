# Rampart: `make demo` and `make test` are the two commands; both run `make setup` first.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTHON ?= python3

# OS packages the node service, the lab and the console need (Debian names).
APT_PACKAGES := python3 python3-venv python3-dev fuse3 libfuse3-3 nftables openssh-server \
	openssh-client iproute2 iputils-ping arping procps psmisc util-linux kmod xvfb xauth \
	libegl1 libgl1 libfontconfig1 libdbus-1-3 libxkbcommon0 libxkbcommon-x11-0 \
	libxcb-cursor0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 \
	libxcb-render-util0 libxcb-shape0 libxcb-xinerama0 libxcb-xkb1 libxcb-xfixes0 \
	systemd init-system-helpers desktop-file-utils dpkg

.PHONY: help setup os-packages venv demo test lint bench clean deb
help:
	@echo "make demo   - set up everything, then run the demo"
	@echo "make test   - set up everything, then lint and run every test"
	@echo "make bench  - set up everything, then run the benchmarks"

setup: os-packages venv

os-packages:
	@missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q '^install ok installed$$' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" != 0 ]; then echo "setup: missing OS packages ($$missing); run as root" >&2; exit 1; fi; \
		echo "setup: installing OS packages:" $$missing; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

venv: $(STAMP)
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[node,console,dev]'
	@touch $(STAMP)

demo: setup
	$(PY) -m node_service.demo

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

test: lint
	$(VENV)/bin/pytest -q

bench: setup
	$(PY) -m bench

# build/deb/rampart_*.deb (node) and rampart-console_*.deb; docs/install.md
deb: setup
	$(PY) installers/deb/build.py --out build/deb

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
