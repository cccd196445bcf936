# aiovirtstream: one Makefile for set-up, tests, demo, benchmarks, docs and lint.
# `make test` and `make demo` work on a fresh Debian 12 machine with Python 3.11 and git:
# they install what is missing (Debian packages as root, a virtualenv, the package).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEB_PACKAGES := libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev pkg-config gcc \
	python3-venv python3-dev qemu-utils \
	qemu-system-x86 busybox-static cpio linux-image-cloud-amd64 openssl chromium
PYTEST_ARGS ?=

.PHONY: all deps debs venv test test-matrix demo bench docs lint clean

all: test

debs:
	@missing=""; for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "Installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(VENV)/.stamp-install: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: debs $(VENV)/.stamp-install

deps: venv

test: deps
	$(PY) -m pytest $(PYTEST_ARGS)

# The suite on every supported Python found here (.venv-3.X each) and on Debian 13's libvirt
# 11.x and Python 3.13 in a debootstrap-built root file system (cached in .cache/trixie-root,
# needs root); CI=true makes a missing interpreter or root file system a failure.
test-matrix: debs
	DEB_PACKAGES="$(DEB_PACKAGES)" PYTEST_ARGS="$(PYTEST_ARGS)" .ci/test-matrix all

demo: deps
	$(PY) -m aiovirtstream demo

bench: deps
	$(PY) -m benchmarks

# The documentation site (MkDocs + mkdocstrings, the docs extra, in dev) in site/; any warning
# (a broken link, a missing object) fails the build.
docs: deps
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --clean
	@echo "Documentation: site/index.html"

lint: deps
	$(VENV)/bin/ruff check aiovirtstream tests benchmarks examples
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) site build *.egg-info
