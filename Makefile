# cpython-perf driver: pristine CPython 3.11 -> patched interpreter with
# Linux perf support.  The work is done by driver/cperf.sh; see README.rst.
#
#   make demo     fetch, patch, build, then profile the seed example
#   make test     the test suite (what CI runs)
#   make check-full  CPython's whole regression suite three ways (long)
#   make bench    perf mode's cost: -X perf vs off, and off vs stock
#                 (ANCHOR=1: CPython 3.13's beside it, make anchor)

DRIVER := bash driver/cperf.sh
PREFIX ?= /usr/local
ROUNDS ?= 60
PROCESS_ROUNDS ?= 300
BACKEND ?= perf
export CPYTHON_SRC FRAME_POINTERS PREFIX

.PHONY: all build demo test check-full check-asan bench docs stock cross \
	nofp debug asan dist install clean distclean deps fetch prepare \
	regen-configure check-fresh deb check-deb anchor viewers check-browser

all: build

build:
	@$(DRIVER) build

demo: build
	@$(DRIVER) demo

stock:
	@$(DRIVER) stock

cross:
	@$(DRIVER) cross

# The patched build without frame pointers (build/obj-nofp), for perf_jit.
nofp:
	@FRAME_POINTERS=no $(DRIVER) build

# The patched build --with-pydebug (build/python-debug), and with
# AddressSanitizer + UBSan (build/python-asan, about 5 minutes).
debug:
	@$(DRIVER) debug

asan:
	@$(DRIVER) asan

test: build stock cross nofp debug check-fresh viewers
	@build/obj/python tests/run_all.py

# The readers of pystacks' outputs that the tests use (Go's pprof built
# from Debian's source, speedscope's schema and ajv from npm), and the
# seed's profile in speedscope in headless chromium (not in make test:
# it installs a browser).
viewers:
	@$(DRIVER) viewers

check-browser: build
	@$(DRIVER) check-browser

# make demo from a clean clone in a minimal Debian bookworm root.
check-fresh:
	@$(DRIVER) check-fresh

# Debian's python3.11 binary packages with our patch (build/deb), and
# their check in a fresh bookworm root; see README, "Debian packages".
deb:
	@$(DRIVER) deb

check-deb:
	@$(DRIVER) check-deb

# The memory-safety set (tests/run_all.py) on the sanitizer build.
check-asan: asan
	@build/obj/python tests/run_all.py --memory build/python-asan

# CPython's whole regression suite: stock, patched, patched with perf on.
check-full: build stock
	@build/obj/python driver/check_full.py

bench: build stock $(if $(ANCHOR),anchor)
	@build/obj/python Tools/perf/bench/bench.py --python build/python \
		--stock build/stock/python --rounds $(ROUNDS) \
		--process-rounds $(PROCESS_ROUNDS) --backend $(BACKEND) \
		$(if $(ANCHOR),--anchor build/anchor/python) \
		--json build/bench/results-$(BACKEND).json

# CPython 3.13 from Debian trixie's source package: make bench ANCHOR=1.
anchor:
	@$(DRIVER) anchor

docs: build
	@$(DRIVER) docs

dist:
	@$(DRIVER) dist

install: build
	@$(DRIVER) install

deps fetch prepare regen-configure:
	@$(DRIVER) $@

# --one-file-system: never into /proc, /sys or /dev of a fresh root that an
# interrupted check-fresh left mounted.
clean:
	rm -rf --one-file-system build/obj build/obj-nofp build/obj-debug build/obj-asan \
		build/stock/obj build/cross-aarch64 build/demo build/logs \
		build/python build/python-nofp build/python-debug build/python-asan

distclean:
	rm -rf --one-file-system build dist
