#!/bin/bash
# Run by "cperf.sh check-deb" as root inside a fresh minimal bookworm root:
# a bookworm machine with Debian's python3.11 upgrades to our packages
# (/root/debs), uses them, and goes back to Debian's.  One line per check
# on stdout; apt's and perf's output in /root/check-deb.log.
set -euo pipefail

DEBS=/root/debs
SEED=/root/seed.py
LOG=/root/check-deb.log
export DEBIAN_FRONTEND=noninteractive

say() { printf '[check-deb] %s\n' "$*"; }
fail() { printf '[check-deb] FAILED: %s\n' "$*"; tail -n 30 "$LOG"; exit 1; }
quiet() { "$@" >>"$LOG" 2>&1 || fail "$* (end of the log above)"; }

version_of() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || true; }

# The packages of ours that this machine has Debian's version of.
installed_of_ours() {
    local deb name
    for deb in "$DEBS"/*.deb; do
        name=$(dpkg-deb -f "$deb" Package)
        if dpkg-query -W -f='${Status}' "$name" 2>/dev/null \
                | grep 'install ok installed' >/dev/null; then
            echo "$deb"
        fi
    done
}

# The hottest report entry with py::baz -> py::bar -> py::foo in one
# stack, in that order (driver/report_excerpt.py); non-zero if none has it.
chain_excerpt() {
    /usr/bin/python3.11 /root/report_excerpt.py "$1" 2>>"$LOG"
}

install_debian_python() {
    quiet apt-get update
    quiet apt-get install -y --no-install-recommends python3.11 python3 \
        linux-perf
    ORIGINAL=$(version_of python3.11)
    say "Debian's python3.11 $ORIGINAL installed, with python3 and perf"
}

upgrade_to_ours() {
    mapfile -t OURS < <(installed_of_ours)
    [ "${#OURS[@]}" -gt 0 ] || fail "none of our packages is installed here"
    quiet apt-get install -y --no-install-recommends "${OURS[@]}"
    NAMES=()
    local deb name version
    for deb in "${OURS[@]}"; do
        name=$(dpkg-deb -f "$deb" Package)
        version=$(dpkg-deb -f "$deb" Version)
        [ "$(version_of "$name")" = "$version" ] ||
            fail "$name is $(version_of "$name"), not $version"
        NAMES+=("$name")
    done
    say "apt install ./*.deb upgraded ${NAMES[*]} to $version"
}

check_sysconfig() {
    /usr/bin/python3.11 -m sysconfig >/root/sysconfig.txt ||
        fail "python3.11 -m sysconfig"
    grep 'PY_HAVE_PERF_TRAMPOLINE = "1"' /root/sysconfig.txt >/dev/null ||
        fail "sysconfig has no PY_HAVE_PERF_TRAMPOLINE = \"1\""
    grep -E '^\s*CONFIGURE_CFLAGS = .*-fno-omit-frame-pointer' \
        /root/sysconfig.txt >/dev/null ||
        fail "python3.11 was not built with frame pointers"
    say "python3.11 -m sysconfig: PY_HAVE_PERF_TRAMPOLINE = \"1\", CONFIGURE_CFLAGS with -fno-omit-frame-pointer"
}

# profile BACKEND REPORT [PERF-RECORD-ARGS...]: the seed under perf record
# with -X BACKEND; REPORT gets perf report's call graph.
profile() {
    local backend=$1 report=$2 data=/root/perf-$1.data
    shift 2
    quiet perf record -F 999 -g "$@" -o "$data" \
        /usr/bin/python3.11 -X "$backend" "$SEED"
    if [ "$backend" = perf_jit ]; then
        quiet perf inject --jit -i "$data" -o "$data.jit"
        data=$data.jit
    fi
    # --no-inline: perf 6.1 pipes DWARF samples' addresses to binutils
    # 2.40's addr2line, which it cannot read, and dies of SIGPIPE.
    perf report --no-inline --stdio -n -g caller --no-children \
        -i "$data" >"$report" 2>>"$LOG" || fail "perf report ($backend)"
}

check_perf() {
    profile perf /root/report-perf.txt
    local excerpt
    excerpt=$(chain_excerpt /root/report-perf.txt) ||
        fail "perf report of -X perf shows no py::baz -> py::bar -> py::foo chain"
    say "perf record -g /usr/bin/python3.11 -X perf seed.py: py::baz -> py::bar -> py::foo"
    printf '%s\n' "$excerpt" | sed -n 's/^/    /; 1,20p'
    profile perf_jit /root/report-perf_jit.txt --call-graph dwarf -k 1
    chain_excerpt /root/report-perf_jit.txt >/dev/null ||
        fail "perf report of -X perf_jit shows no py::baz -> py::bar -> py::foo chain"
    say "perf record --call-graph dwarf ... -X perf_jit, perf inject --jit: py::baz -> py::bar -> py::foo"
}

# Debian's numpy (a C extension built against Debian's python3.11) under
# -X perf: it imports, computes, and its Python functions are in the map.
check_numpy() {
    quiet apt-get install -y --no-install-recommends python3-numpy
    local out pid result inverse
    out=$(/usr/bin/python3.11 -X perf -c '
import os, numpy
a = numpy.arange(1000, dtype=numpy.float64)
print(os.getpid(), float(a @ a), numpy.linalg.inv(numpy.eye(3) * 2)[0, 0])') ||
        fail "python3.11 -X perf with numpy exited with status $?"
    read -r pid result inverse <<<"$out"
    [ "$result" = 332833500.0 ] && [ "$inverse" = 0.5 ] ||
        fail "numpy under -X perf computed $out"
    grep ' py::.*:/usr/lib/python3/dist-packages/numpy/' \
        "/tmp/perf-$pid.map" >/dev/null ||
        fail "/tmp/perf-$pid.map names no numpy function"
    say "python3-numpy $(version_of python3-numpy) under -X perf: a @ a = $result, its functions in /tmp/perf-$pid.map"
}

check_apt_still_works() {
    quiet apt-get install -y --no-install-recommends python3-yaml
    /usr/bin/python3 -c 'import yaml; assert yaml.safe_load("a: [1, 2]") == {"a": [1, 2]}' ||
        fail "python3-yaml does not work"
    quiet apt-get check
    say "apt-get install python3-yaml $(version_of python3-yaml) against our packages: works; apt-get check: clean"
}

back_to_debian() {
    local name wanted=()
    for name in "${NAMES[@]}"; do
        wanted+=("$name=$ORIGINAL")
    done
    quiet apt-get install -y --allow-downgrades --no-install-recommends \
        "${wanted[@]}"
    for name in "${NAMES[@]}"; do
        [ "$(version_of "$name")" = "$ORIGINAL" ] ||
            fail "$name is $(version_of "$name") after going back, not $ORIGINAL"
    done
    quiet apt-get check
    [ -z "$(dpkg --audit)" ] || fail "dpkg --audit: $(dpkg --audit)"
    /usr/bin/python3.11 -c 'import sysconfig, numpy, yaml
assert not sysconfig.get_config_var("PY_HAVE_PERF_TRAMPOLINE")' ||
        fail "Debian's python3.11 does not work after going back"
    say "apt-get install --allow-downgrades ${wanted[*]}: back to Debian's, numpy and yaml import, dpkg --audit clean"
}

main() {
    : >"$LOG"
    install_debian_python
    upgrade_to_ours
    check_sysconfig
    check_perf
    check_numpy
    check_apt_still_works
    back_to_debian
    say "all checks passed"
}

main "$@"
