# cpython-perf driver: pristine CPython 3.11 -> patched interpreter with
# Linux perf support.  The work is done by driver/cperf.sh; see README.rst.
#
#   make demo     fetch, patch, build, then profile the seed example
#   make test     the test suite (what CI runs)

DRIVER := bash driver/cperf.sh
PREFIX ?= /usr/local
export CPYTHON_SRC FRAME_POINTERS PREFIX

.PHONY: all build demo test stock dist install clean distclean deps fetch prepare

all: build

build:
	@$(DRIVER) build

demo: build
	@$(DRIVER) demo

stock:
	@$(DRIVER) stock

test: build stock
	@build/obj/python tests/run_all.py

dist:
	@$(DRIVER) dist

install: build
	@$(DRIVER) install

deps fetch prepare:
	@$(DRIVER) $@

clean:
	rm -rf build/obj build/stock/obj build/demo build/logs build/python

distclean:
	rm -rf build dist
