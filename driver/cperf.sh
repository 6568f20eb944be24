#!/bin/bash
# The driver behind the top-level Makefile: turns pristine CPython 3.11 into
# the patched, frame-pointer build.  Every step prints one short progress
# line and sends its long output to build/logs/<step>.log; on failure it
# prints the end of that log and exits non-zero.
#
#   cperf.sh deps | fetch | prepare | build | debug | asan | stock | cross
#            | anchor | dist | install | demo | docs | regen-configure
#            | debian-source DEST | check-fresh | deb | deb-source DEST
#            | check-deb | viewers | check-browser
#
# Environment: CPYTHON_SRC (tarball or unpacked tree), CPERF_CACHE (download
# cache, default ~/.cache/cpython-perf), FRAME_POINTERS (yes/no), PREFIX.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=$ROOT/build
LOGS=$BUILD/logs
CACHE=${CPERF_CACHE:-$HOME/.cache/cpython-perf}
PRISTINE_NAME=python3.11_3.11.2.orig.tar.gz
PRISTINE_SHA256=2411c74bda5bbcfcddaf4531f66d1adc73f247f529aee981b029513aefdbf849
# Directories of our tree that hold new files at their CPython paths.
NEW_FILE_DIRS="Python Include Lib Doc Misc Tools"
FP_CFLAGS="-fno-omit-frame-pointer -mno-omit-leaf-frame-pointer"
JOBS=$(nproc)

REQUIRED_PACKAGES="autoconf pkg-config build-essential
    libffi-dev zlib1g-dev libssl-dev linux-perf rsync util-linux valgrind
    python3-sphinx gdb"
OPTIONAL_PACKAGES="libbz2-dev liblzma-dev libsqlite3-dev libreadline-dev
    libgdbm-dev libgdbm-compat-dev uuid-dev libncurses-dev"
# Real code for make bench (Tools/perf/bench/workloads/debian.py): pure
# Python, which any 3.x interpreter imports from Debian's dist-packages.
BENCH_PACKAGES="python3-docutils python3-pygments python3-sympy
    python3-networkx"
# The programs that read Tools/perf/pystacks.py's outputs in the tests:
# Go's pprof, built from Debian's packaged source (cmd_viewers), and from
# npm speedscope (its file-format schema; its page for make
# check-browser), ajv to validate against that schema and playwright-core
# to drive Debian's chromium (1.61: the last that runs on bookworm's
# node 18).
VIEWER_PACKAGES="golang-go golang-github-google-pprof-dev"
VIEWER_NPM="speedscope@1.25.0 ajv@8.20.0"
BROWSER_NPM="playwright-core@1.61.1"
VIEWERS=$CACHE/viewers
# For the aarch64 cross-build that the tests run under qemu.
CROSS_PACKAGES="gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user"
CROSS_HOST=aarch64-linux-gnu

say() { printf '[%s] %s\n' "$STEP" "$*"; }
die() { printf '[%s] error: %s\n' "$STEP" "$*" >&2; exit 1; }

# run LOG CMD...: run CMD with its output in build/logs/LOG.log; on failure
# show the end of the log.
run() {
    local log=$LOGS/$1.log
    shift
    mkdir -p "$LOGS"
    if ! "$@" >>"$log" 2>&1; then
        printf '[%s] error: %s failed; last lines of %s:\n' \
            "$STEP" "$1" "${log#"$ROOT"/}" >&2
        tail -n 25 "$log" >&2
        exit 1
    fi
}

# ---------------------------------------------------------------- deps

missing_packages() {
    local pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null \
            | grep -q 'install ok installed' || echo "$pkg"
    done
}

# install_packages PKG...: install those of PKG that are missing.
install_packages() {
    local missing
    missing=$(missing_packages "$@" | xargs)
    if [ -z "$missing" ]; then
        say "all needed packages present"
        return
    fi
    if [ "$(id -u)" != 0 ]; then
        die "missing Debian packages: $missing
    install them as root: apt-get install $missing"
    fi
    say "installing $missing"
    run deps apt-get update
    # shellcheck disable=SC2086
    run deps env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends $missing
}

cmd_deps() {
    STEP=deps
    # shellcheck disable=SC2086
    install_packages $REQUIRED_PACKAGES $OPTIONAL_PACKAGES $BENCH_PACKAGES
}

# --------------------------------------------------------------- fetch

have_deb_src() {
    grep -Eqs '^[[:space:]]*(deb-src[[:space:]]|Types:.*deb-src)' \
        /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
        /etc/apt/sources.list.d/*.sources
}

# deb_src_entry URI SUITE: apt's entry for the sources of SUITE's main.
deb_src_entry() {
    printf '%s\n' "Types: deb-src" "URIs: $1" "Suites: $2" \
        "Components: main" \
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg"
}

# add_deb_src NAME URI SUITE: as root, adds the entry as
# /etc/apt/sources.list.d/cpython-perf-NAME.sources (sources only: apt
# installs nothing from it) and updates apt's lists; otherwise dies with
# the entry to add.
add_deb_src() {
    local entry=/etc/apt/sources.list.d/cpython-perf-$1.sources
    [ "$(id -u)" = 0 ] || die "apt knows no source needed from $3; as root add $entry with:
$(deb_src_entry "$2" "$3" | sed 's/^/    /')"
    say "adding a deb-src entry for $3: $entry"
    deb_src_entry "$2" "$3" >"$entry"
    run "$STEP" apt-get update
}

ensure_deb_src() {
    have_deb_src && return
    add_deb_src src http://deb.debian.org/debian bookworm
}

verify_tarball() {
    local file=$1 sum
    sum=$(sha256sum "$file" | cut -d' ' -f1)
    if [ "$sum" != "$PRISTINE_SHA256" ]; then
        rm -f "$file"
        die "checksum mismatch for $file
    expected $PRISTINE_SHA256
    got      $sum
    the file was deleted; run the command again to download a fresh copy"
    fi
}

# Sets SRC to the pristine 3.11.2 tarball, downloading it once.
pristine_tarball() {
    local tarball=$CACHE/$PRISTINE_NAME
    if [ -f "$tarball" ]; then
        verify_tarball "$tarball"
        SRC=$tarball
        return
    fi
    ensure_deb_src
    say "downloading pristine CPython 3.11.2 (apt-get source python3.11)"
    mkdir -p "$CACHE"
    local tmp
    tmp=$(mktemp -d "$CACHE/download.XXXXXX")
    (cd "$tmp" && run fetch apt-get source --download-only --tar-only \
        python3.11) || { rm -rf "$tmp"; exit 1; }
    [ -f "$tmp/$PRISTINE_NAME" ] || {
        rm -rf "$tmp"
        die "apt-get source did not provide $PRISTINE_NAME"
    }
    verify_tarball "$tmp/$PRISTINE_NAME"
    mv "$tmp/$PRISTINE_NAME" "$tarball"
    rm -rf "$tmp"
    SRC=$tarball
}

# The version "3.11.N" of an unpacked tree or tarball, from patchlevel.h.
source_version() {
    local src=$1 header
    if [ -d "$src" ]; then
        header=$(cat "$src/Include/patchlevel.h" 2>/dev/null) || true
    else
        header=$(tar -xOf "$src" --wildcards --no-anchored \
            'Include/patchlevel.h' 2>/dev/null) || true
    fi
    [ -n "$header" ] || die "$src: no Include/patchlevel.h; not a CPython source tree"
    local major minor micro
    major=$(sed -n 's/^#define PY_MAJOR_VERSION[[:space:]]*\([0-9]*\).*/\1/p' <<<"$header")
    minor=$(sed -n 's/^#define PY_MINOR_VERSION[[:space:]]*\([0-9]*\).*/\1/p' <<<"$header")
    micro=$(sed -n 's/^#define PY_MICRO_VERSION[[:space:]]*\([0-9]*\).*/\1/p' <<<"$header")
    echo "$major.$minor.$micro"
}

# Sets SRC to the source to build from: CPYTHON_SRC or the pristine tarball.
upstream_source() {
    STEP=fetch
    if [ -z "${CPYTHON_SRC:-}" ]; then
        pristine_tarball
        return
    fi
    [ -e "$CPYTHON_SRC" ] || die "CPYTHON_SRC=$CPYTHON_SRC does not exist"
    local version
    version=$(source_version "$CPYTHON_SRC")
    case $version in
        3.11.*) ;;
        *) die "CPYTHON_SRC=$CPYTHON_SRC is CPython $version; this patch is for 3.11.x only" ;;
    esac
    SRC=$(realpath "$CPYTHON_SRC")
}

cmd_fetch() {
    upstream_source
    local src=$SRC
    STEP=fetch
    say "upstream source: $src ($(source_version "$src"))"
}

# ------------------------------------------------------------- prepare

# unpack SRC DEST: DEST becomes a copy of the upstream tree.
unpack() {
    local src=$1 dest=$2
    rm -rf "$dest"
    mkdir -p "$dest"
    if [ -d "$src" ]; then
        cp -a "$src/." "$dest/"
    else
        tar -xf "$src" -C "$dest" --strip-components=1
    fi
}

series() { grep -Ev '^[[:space:]]*(#|$)' "$ROOT/patches/series"; }

apply_series() {
    local tree=$1 n=0 total patch
    total=$(series | wc -l)
    for patch in $(series); do
        n=$((n + 1))
        say "$n/$total $patch"
        if ! patch -d "$tree" -p1 -F0 -N --no-backup-if-mismatch \
                <"$ROOT/patches/$patch" >"$LOGS/patch-$patch.log" 2>&1; then
            cat "$LOGS/patch-$patch.log" >&2
            die "patch $patch does not apply (hunk above)"
        fi
        if grep -q 'with fuzz\|offset' "$LOGS/patch-$patch.log"; then
            grep 'with fuzz\|offset' "$LOGS/patch-$patch.log" | sed 's/^/    /'
        fi
    done
}

copy_new_files() {
    local tree=$1 dir
    for dir in $NEW_FILE_DIRS; do
        [ -d "$ROOT/$dir" ] || continue
        # -c: only files whose contents changed get a new mtime, so make
        # rebuilds exactly what changed.
        rsync -rc --exclude=__pycache__ "$ROOT/$dir/" "$tree/$dir/"
    done
}

# A fingerprint of the upstream source.
source_stamp() {
    local src=$1
    {
        echo "$src"
        if [ -d "$src" ]; then
            (cd "$src" && find . -type f -printf '%P %s %T@\n' | sort)
        else
            sha256sum <"$src"
        fi
    } | sha256sum | cut -d' ' -f1
}

# A fingerprint of everything that decides the patched tree except the
# contents of our new files (those are synced on every build).
tree_stamp() {
    local src=$1
    {
        source_stamp "$src"
        cat "$ROOT/patches/series"
        series | while read -r p; do cat "$ROOT/patches/$p"; done
        (cd "$ROOT" && find $NEW_FILE_DIRS -type f 2>/dev/null | sort)
        sha256sum <"$ROOT/driver/cperf.sh"
    } | sha256sum | cut -d' ' -f1
}

# build/src for every build that uses it (patched, nofp, debug, asan,
# cross).  make -j test runs several at once: one prepares, the others
# wait for it (flock), then find build/src up to date.
cmd_prepare() {
    upstream_source
    STEP=patch
    mkdir -p "$LOGS"
    local lock
    exec {lock}>"$BUILD/.prepare.lock"
    flock "$lock"
    prepare_locked "$SRC"
    exec {lock}>&-
}

prepare_locked() {
    local src=$1 stamp
    stamp=$(tree_stamp "$src")
    if [ -f "$BUILD/src/.cperf-stamp" ] &&
            [ "$(cat "$BUILD/src/.cperf-stamp")" = "$stamp" ]; then
        copy_new_files "$BUILD/src"
        return
    fi
    # Patch a fresh copy of the pristine tree, then sync it over build/src:
    # files whose contents did not change keep their mtime.
    local stage=$BUILD/stage
    say "unpacking $(basename "$src") into a fresh tree"
    unpack "$src" "$stage"
    copy_new_files "$stage"
    # The series carries configure and pyconfig.h.in (patch 0001): the
    # build uses them as they are, as a packager who regenerates nothing
    # does.
    apply_series "$stage"
    mkdir -p "$BUILD/src"
    rsync -rlc --delete --exclude=.cperf-stamp "$stage/" "$BUILD/src/"
    rm -rf "$stage"
    echo "$stamp" >"$BUILD/src/.cperf-stamp"
}

# --------------------------------------------------------------- build

cflags() {
    case ${FRAME_POINTERS:-yes} in
        yes) echo "$FP_CFLAGS" ;;
        no) echo "-fomit-frame-pointer" ;;
        *) die "FRAME_POINTERS must be yes or no" ;;
    esac
}

# The patched build's directory, relative to build/: each FRAME_POINTERS
# setting has its own, so switching never rebuilds the other.
patched_obj() {
    cflags >/dev/null
    case ${FRAME_POINTERS:-yes} in
        yes) echo obj ;;
        no) echo obj-nofp ;;
    esac
}

# build/python for the frame-pointer build, build/python-nofp without.
patched_python() {
    local obj
    obj=$(patched_obj)
    echo "python${obj#obj}"
}

# configure_and_make SRC OBJ TARGET CFLAGS [CONFIGURE-ARG...]: out-of-tree
# build of SRC in OBJ; reconfigures when the flags, arguments or configure
# change.
configure_and_make() {
    local src=$1 obj=$2 target=$3 flags=$4 stamp
    shift 4
    stamp=$(printf '%s\n' "$flags" "$*" "$(sha256sum <"$src/configure")" \
        | sha256sum)
    mkdir -p "$obj"
    if [ ! -f "$obj/Makefile" ] || [ ! -f "$obj/.cperf-configure" ] ||
            [ "$(cat "$obj/.cperf-configure")" != "$stamp" ]; then
        say "configure ($obj) CFLAGS='$flags' $*"
        (cd "$obj" && run "configure-$(tr / - <<<"${obj#"$BUILD"/}")" \
            "$src/configure" CFLAGS="$flags" --with-ensurepip=no "$@")
        echo "$stamp" >"$obj/.cperf-configure"
    fi
    say "make -j$JOBS $target ($obj)"
    run build make -C "$obj" -j"$JOBS" $target
}

cmd_build() {
    cmd_deps
    cmd_prepare
    STEP=build
    : >"$LOGS/build.log"
    local obj python
    obj=$(patched_obj)
    python=$(patched_python)
    configure_and_make "$BUILD/src" "$BUILD/$obj" all "$(cflags)"
    ln -sfn "$obj/python" "$BUILD/$python"
    say "built build/$python: $("$BUILD/$python" -c 'import sys; print(sys.version.split()[0])')"
}

# The patched tree for the memory-safety runs (tests/run_all.py --memory):
# --with-pydebug (assertions, the debug allocator filling freed memory)
# into build/obj-debug, or AddressSanitizer + UBSan into build/obj-asan,
# both with frame pointers.
cmd_debug() {
    cmd_build
    STEP=debug
    : >"$LOGS/build.log"
    configure_and_make "$BUILD/src" "$BUILD/obj-debug" all "$FP_CFLAGS" \
        --with-pydebug
    ln -sfn obj-debug/python "$BUILD/python-debug"
    say "built build/python-debug (--with-pydebug)"
}

cmd_asan() {
    cmd_build
    STEP=asan
    : >"$LOGS/build.log"
    # The build runs the new interpreter (sharedmods), which must not stop
    # on LeakSanitizer's reports of what CPython never frees at exit.
    ASAN_OPTIONS=detect_leaks=0 configure_and_make "$BUILD/src" \
        "$BUILD/obj-asan" all "$FP_CFLAGS" --with-address-sanitizer \
        --with-undefined-behavior-sanitizer --without-pymalloc
    ln -sfn obj-asan/python "$BUILD/python-asan"
    say "built build/python-asan (AddressSanitizer + UBSan)"
}

cmd_stock() {
    cmd_deps
    upstream_source
    local src=$SRC
    STEP=stock
    mkdir -p "$LOGS" "$BUILD/stock"
    local stamp
    stamp=$(source_stamp "$src")
    if [ ! -f "$BUILD/stock/src/.cperf-stamp" ] ||
            [ "$(cat "$BUILD/stock/src/.cperf-stamp")" != "$stamp" ]; then
        say "unpacking pristine $(basename "$src") into build/stock/src"
        unpack "$src" "$BUILD/stock/src"
        rm -rf "$BUILD/stock/obj"
        echo "$stamp" >"$BUILD/stock/src/.cperf-stamp"
    fi
    : >"$LOGS/build.log"
    configure_and_make "$BUILD/stock/src" "$BUILD/stock/obj" all "$(cflags)"
    ln -sfn obj/python "$BUILD/stock/python"
    say "built build/stock/python (no patches)"
}

# --------------------------------------------------------------- cross

# The patched source cross-built for aarch64 Linux, as far as libpython:
# tests/test_cross.py links its checker with it and runs that under
# qemu-aarch64.  Branch protection (PAC + BTI) is on, as Arm distributions
# build, and qemu's default CPU enforces pointer authentication.
cmd_cross() {
    cmd_build
    STEP=cross
    # shellcheck disable=SC2086
    install_packages $CROSS_PACKAGES
    : >"$LOGS/build.log"
    # A cross configure cannot probe the target's devices and getaddrinfo;
    # the answers are those of any aarch64 Linux with glibc.
    # Frame pointers whatever FRAME_POINTERS says: the check walks them.
    configure_and_make "$BUILD/src" "$BUILD/cross-aarch64/obj" \
        libpython3.11.a "$FP_CFLAGS -mbranch-protection=standard" \
        --host=$CROSS_HOST --build="$(gcc -dumpmachine)" \
        --with-build-python="$BUILD/obj/python" \
        ac_cv_file__dev_ptmx=yes ac_cv_file__dev_ptc=no \
        ac_cv_buggy_getaddrinfo=no
    say "built build/cross-aarch64/obj/libpython3.11.a"
}

# ------------------------------------------------------ regen-configure

CONFIGURE_PATCH=0001-configure-perf-trampoline.patch

# diff -u that fails only on trouble (1 means the files differ).
udiff() { diff -u "$@" || [ $? = 1 ]; }

# The section of a patch that changes one file (from its "--- a/FILE").
patch_section() {
    awk -v file="$2" '
        /^--- a\// { on = ($2 == "a/" file) }
        on { print }' "$1"
}

# Patch 0001 carries configure and pyconfig.h.in as autoconf 2.69 and
# autoheader (what generates them upstream for 3.11) make them from its
# configure.ac hunk, so that builds that regenerate nothing, or run
# autoconf alone, get perf support.  After editing the configure.ac hunk,
# this rewrites the patch's configure and pyconfig.h.in hunks.  Debian's
# autoconf 2.69 lacks the runstatedir option of upstream's, so the hunks
# are the difference between two regenerations, applied to the pristine
# files.
cmd_regen_configure() {
    upstream_source
    local src=$SRC
    STEP=regen-configure
    install_packages autoconf2.69
    local work=$BUILD/regen patch=$ROOT/patches/$CONFIGURE_PATCH dir
    rm -rf "$work"
    mkdir -p "$LOGS"
    patch_section "$patch" configure.ac >"$work.ac.diff"
    for dir in pristine before after result; do
        unpack "$src" "$work/$dir"
    done
    patch -d "$work/after" -p1 -F0 <"$work.ac.diff" >/dev/null
    for dir in before after; do
        (cd "$work/$dir" && run regen autoconf2.69 -f &&
            run regen autoheader2.69 -f)
    done
    (cd "$work" && udiff before/configure after/configure &&
        udiff before/pyconfig.h.in after/pyconfig.h.in) \
        | patch -d "$work/result" -p1 -F0 >/dev/null
    {
        sed '/^---$/q' "$patch"
        cat "$work.ac.diff"
        (cd "$work" && for file in configure pyconfig.h.in; do
            udiff "pristine/$file" "result/$file" \
                | sed "1s|.*|--- a/$file|; 2s|.*|+++ b/$file|"
        done)
    } >"$work.patch"
    mv "$work.patch" "$patch"
    rm -rf "$work" "$work.ac.diff"
    say "rewrote patches/$CONFIGURE_PATCH"
}

# --------------------------------------------------------- debian-source

DEBIAN_CACHE=$CACHE/debian-source

# The python3.11 that apt installs here: on bookworm a security update
# (bookworm-security) newer than the point release.
candidate_version() {
    apt-cache policy python3.11 | sed -n 's/^  Candidate: //p'
}

# The versions of python3.11's source that apt knows, newest first.
source_versions() {
    apt-cache showsrc python3.11 | sed -n 's/^Version: //p' | sort -rVu
}

# Adds a deb-src entry for bookworm-security when apt installs a
# python3.11 whose source it does not know.
ensure_security_source() {
    local candidate=$1
    source_versions | grep -x "$candidate" >/dev/null && return
    [ "$(id -u)" = 0 ] || return 0
    add_deb_src security-src http://deb.debian.org/debian-security \
        bookworm-security
}

# Sets DSC to the cached .dsc of Debian's python3.11 source package,
# downloaded once (apt checks it against the signed archive index): the
# version apt installs, or where the archive does not serve that one's
# source, the newest it does serve.
debian_source_package() {
    local candidate version
    ensure_deb_src
    candidate=$(candidate_version)
    [ -n "$candidate" ] || die "apt knows no python3.11 package"
    ensure_security_source "$candidate"
    mkdir -p "$DEBIAN_CACHE" "$LOGS"
    for version in $(source_versions); do
        DSC=$DEBIAN_CACHE/python3.11_${version#*:}.dsc
        [ -f "$DSC" ] && break
        say "downloading Debian's python3.11 $version source package"
        (cd "$DEBIAN_CACHE" && apt-get source --download-only \
            "python3.11=$version" >>"$LOGS/$STEP.log" 2>&1) && break
        say "the archive does not serve python3.11 $version's source (see build/logs/$STEP.log)"
        DSC=
    done
    [ -n "$DSC" ] || die "apt could download no python3.11 source package"
    version=$(basename "$DSC" .dsc)
    version=${version#python3.11_}
    if dpkg --compare-versions "$version" lt "${candidate#*:}"; then
        say "warning: building Debian's $version, older than the $candidate apt installs here"
    fi
}

# unpack_debian_source DEST: Debian's source package, with Debian's
# patches applied, in DEST.
unpack_debian_source() {
    local dest=$1
    debian_source_package
    rm -rf "$dest"
    mkdir -p "$LOGS"
    # apt-get checked the files; dpkg would look for a keyring that a
    # build machine need not have.
    run "$STEP" dpkg-source --no-check -x "$DSC" "$dest"
    say "unpacked $(basename "$DSC") with its patches into ${dest#"$ROOT"/}"
}

# For the test of the dist patch as Debian builds it
# (tests/test_packagers.py).
cmd_debian_source() {
    local dest=$1
    STEP=debian-source
    [ -n "$dest" ] || die "usage: debian-source DEST"
    unpack_debian_source "$dest"
}

# -------------------------------------------------------------- anchor

# Upstream's own perf support side by side (make bench ANCHOR=1): CPython
# 3.13 from Debian trixie's python3.13 source package, apt-checked against
# the signed archive index.  Upstream's sources as released (Debian's own
# patches are packaging), built as ours, with frame pointers, into
# build/anchor.
ANCHOR_PACKAGE=python3.13
ANCHOR_CACHE=$CACHE/anchor

anchor_source_version() {
    apt-cache showsrc "$ANCHOR_PACKAGE" 2>/dev/null \
        | sed -n 's/^Version: //p' | sort -rV | head -n 1
}

# Adds a deb-src entry for trixie when apt knows no python3.13 source.
ensure_anchor_source() {
    [ -n "$(anchor_source_version)" ] && return
    add_deb_src anchor-src http://deb.debian.org/debian trixie
}

# Sets ANCHOR_TARBALL to the cached upstream tarball of Debian's
# python3.13, downloaded once with its .dsc.
anchor_tarball() {
    local version upstream dsc
    ensure_anchor_source
    version=$(anchor_source_version)
    [ -n "$version" ] || die "apt knows no $ANCHOR_PACKAGE source package"
    upstream=${version#*:}
    upstream=${upstream%-*}
    dsc=$ANCHOR_CACHE/${ANCHOR_PACKAGE}_${version#*:}.dsc
    if [ ! -f "$dsc" ]; then
        mkdir -p "$ANCHOR_CACHE"
        say "downloading Debian's $ANCHOR_PACKAGE $version source package"
        (cd "$ANCHOR_CACHE" && run anchor apt-get source --download-only \
            "$ANCHOR_PACKAGE=$version")
    fi
    for ANCHOR_TARBALL in "$ANCHOR_CACHE/${ANCHOR_PACKAGE}_$upstream".orig.tar.{xz,gz,bz2}; do
        [ -f "$ANCHOR_TARBALL" ] && return
    done
    die "no upstream tarball beside $dsc"
}

cmd_anchor() {
    cmd_deps
    STEP=anchor
    mkdir -p "$LOGS" "$BUILD/anchor"
    anchor_tarball
    local stamp
    stamp=$(source_stamp "$ANCHOR_TARBALL")
    if [ ! -f "$BUILD/anchor/src/.cperf-stamp" ] ||
            [ "$(cat "$BUILD/anchor/src/.cperf-stamp")" != "$stamp" ]; then
        say "unpacking $(basename "$ANCHOR_TARBALL") into build/anchor/src"
        unpack "$ANCHOR_TARBALL" "$BUILD/anchor/src"
        rm -rf "$BUILD/anchor/obj"
        echo "$stamp" >"$BUILD/anchor/src/.cperf-stamp"
    fi
    : >"$LOGS/build.log"
    configure_and_make "$BUILD/anchor/src" "$BUILD/anchor/obj" all \
        "$FP_CFLAGS"
    ln -sfn obj/python "$BUILD/anchor/python"
    say "built build/anchor/python: $("$BUILD/anchor/python" -c 'import sys; print(sys.version.split()[0])')"
}

# ----------------------------------------------------------------- deb

DEB_DIR=$BUILD/deb
DEB_PATCH=cpython-perf.patch
# Appended to Debian's version: sorts above it, below its next update.
DEB_VERSION_SUFFIX=+perf1
DEB_DEFAULT_OPTIONS="nocheck nopgo nolto parallel=$JOBS"

# The dist patch as the last of Debian's patches: dpkg-buildpackage
# (dpkg-source --before-build) applies it with the others' rules, no fuzz.
add_our_patch() {
    local tree=$1
    cp "$ROOT/dist/python3.11-perf.patch" "$tree/debian/patches/$DEB_PATCH"
    echo "$DEB_PATCH" >>"$tree/debian/patches/series"
}

# Frame pointers in every flavour debian/rules builds: its flags all come
# from dpkg-buildflags, which appends DEB_CFLAGS_MAINT_APPEND.  (An
# exported make variable would not reach rules' $(shell) calls.)
add_frame_pointers() {
    local rules=$1/debian/rules
    local definition='^\([[:space:]]*dpkg_[a-z]*flags = \)'
    sed -i "s|$definition\(DEB_BUILD_MAINT_OPTIONS=\)|\1DEB_CFLAGS_MAINT_APPEND=\"$FP_CFLAGS\" \2|" \
        "$rules"
    # bookworm's rules define dpkg_buildflags once, dpkg_pieflags twice.
    [ "$(grep -c "^[[:space:]]*dpkg_[a-z]*flags = DEB_CFLAGS_MAINT_APPEND=" "$rules")" -ge 3 ] ||
        die "debian/rules has no dpkg-buildflags definitions to add frame pointers to"
}

# A changelog entry for our local version, which names what changed.
add_changelog_entry() {
    local tree=$1 version=$2
    local entry=$tree/debian/changelog.perf
    {
        echo "python3.11 ($version) bookworm; urgency=medium"
        echo
        echo "  * Linux perf support (python -X perf, PYTHONPERFSUPPORT=1,"
        echo "    sys.activate_stack_trampoline) from cpython-perf"
        echo "    $(git -C "$ROOT" rev-parse --short HEAD): debian/patches/$DEB_PATCH."
        echo "  * Built with $FP_CFLAGS."
        echo
        echo " -- ${DEBFULLNAME:-cpython-perf} <${DEBEMAIL:-root@localhost}>  $(date -R)"
        echo
        cat "$tree/debian/changelog"
    } >"$entry"
    mv "$entry" "$tree/debian/changelog"
}

# prepare_deb_tree TREE: Debian's python3.11 source in TREE with our
# patch, frame pointers and a local version (in DEB_VERSION).
prepare_deb_tree() {
    local tree=$1 step=$STEP
    install_packages dpkg-dev
    cmd_dist
    STEP=$step
    unpack_debian_source "$tree"
    DEB_VERSION=$(dpkg-parsechangelog -l "$tree/debian/changelog" -S Version)
    DEB_VERSION=$DEB_VERSION$DEB_VERSION_SUFFIX
    add_our_patch "$tree"
    add_frame_pointers "$tree"
    add_changelog_entry "$tree" "$DEB_VERSION"
}

# For the test of that tree (tests/test_packagers.py).
cmd_deb_source() {
    local dest=$1
    STEP=deb-source
    [ -n "$dest" ] || die "usage: deb-source DEST"
    prepare_deb_tree "$dest"
}

# Debian's binary packages of python3.11 with our patch, frame pointers
# and a local version, in build/deb.  DEB_BUILD_OPTIONS passes through.
cmd_deb() {
    STEP=deb
    [ "$(id -u)" = 0 ] || die "deb installs build dependencies: run it as root"
    rm -rf "$DEB_DIR"
    mkdir -p "$DEB_DIR"
    local tree=$DEB_DIR/python3.11
    prepare_deb_tree "$tree"
    say "installing the build dependencies (apt-get build-dep)"
    run deb env DEBIAN_FRONTEND=noninteractive \
        apt-get build-dep -y "$tree"
    local options=${DEB_BUILD_OPTIONS-$DEB_DEFAULT_OPTIONS}
    say "dpkg-buildpackage -b $DEB_VERSION, DEB_BUILD_OPTIONS='$options' (log: build/logs/deb-build.log)"
    local start=$SECONDS
    : >"$LOGS/deb-build.log"
    (cd "$tree" && DEB_BUILD_OPTIONS=$options run deb-build \
        dpkg-buildpackage -b -us -uc)
    say "built in $(((SECONDS - start) / 60)) min $(((SECONDS - start) % 60)) s:"
    (cd "$DEB_DIR" && ls ./*.deb | sed 's|^\./|    build/deb/|')
}

# ---------------------------------------------------------- check-fresh

FRESH_SUITE=bookworm
FRESH_MIRROR=http://deb.debian.org/debian
FRESH_MOUNTS="proc sys dev"

# Sets FRESH_TARBALL to a minimal Debian bookworm root (mmdebstrap's
# minbase plus make, which the README's commands need), built once from
# the Debian archive and cached outside the repo.
fresh_root_tarball() {
    FRESH_TARBALL=$CACHE/$FRESH_SUITE-minbase.tar
    [ -f "$FRESH_TARBALL" ] && return
    install_packages mmdebstrap
    say "building a minimal $FRESH_SUITE root (mmdebstrap --variant=minbase)"
    mkdir -p "$CACHE"
    run check-fresh mmdebstrap --variant=minbase --include=make \
        "$FRESH_SUITE" "$CACHE/partial-root.tar" "$FRESH_MIRROR"
    mv "$CACHE/partial-root.tar" "$FRESH_TARBALL"
}

unmount_fresh_root() {
    local root=$1 fs
    for fs in $FRESH_MOUNTS; do
        if mountpoint -q "$root/$fs"; then
            umount -l "$root/$fs"
        fi
    done
}

# enter_fresh_root ROOT: ROOT becomes a fresh minimal bookworm root with
# this machine's name servers and /proc, /sys and /dev mounted (for perf);
# leave_fresh_root ROOT unmounts them (also on exit).  Hard links to the
# host's downloaded packages spare downloads; they are not a bind mount,
# which removing the root would empty.
enter_fresh_root() {
    local root=$1 fs
    [ "$(id -u)" = 0 ] || die "$STEP needs root (chroot, mounts)"
    mkdir -p "$LOGS"
    fresh_root_tarball
    unmount_fresh_root "$root"
    rm -rf --one-file-system "$root"
    mkdir -p "$root"
    tar -xf "$FRESH_TARBALL" -C "$root"
    cp /etc/resolv.conf "$root/etc/resolv.conf"
    cp -al /var/cache/apt/archives/*.deb "$root/var/cache/apt/archives/" \
        2>/dev/null || true     # another file system: download them
    trap 'unmount_fresh_root "'"$root"'"' EXIT
    for fs in $FRESH_MOUNTS; do
        mkdir -p "$root/$fs"
        mount --bind "/$fs" "$root/$fs"
    done
}

leave_fresh_root() {
    unmount_fresh_root "$1"
    trap - EXIT
}

# in_fresh_root ROOT COMMAND: COMMAND run by bash as root in ROOT, with a
# clean environment.
in_fresh_root() {
    chroot "$1" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
        HOME=/root LANG=C.UTF-8 bash -c "$2"
}

# The README's first command on a fresh machine: a clean clone of this
# checkout's HEAD in a minimal bookworm root runs "make demo" there, and
# it must show the seed's py:: chain.
cmd_check_fresh() {
    STEP=check-fresh
    local root=$BUILD/fresh-root log=$LOGS/check-fresh-demo.log
    enter_fresh_root "$root"
    say "clean clone of $(git -C "$ROOT" rev-parse --short HEAD) into the root"
    git clone -q "$ROOT" "$root/root/cpython-perf"
    say "make demo in the fresh root (output: ${log#"$ROOT"/})"
    local start=$SECONDS status=0
    in_fresh_root "$root" 'cd /root/cpython-perf && make demo' >"$log" 2>&1 ||
        status=$?
    leave_fresh_root "$root"
    if [ "$status" != 0 ]; then
        tail -n 25 "$log" >&2
        die "make demo failed in the fresh root"
    fi
    # The chain, outermost first, as the report prints it.
    if ! grep -o 'py::[a-z]*:' "$log" | tr -d '\n' \
            | grep -q 'py::baz:py::bar:py::foo:'; then
        tail -n 40 "$log" >&2
        die "the demo in the fresh root shows no py::baz -> py::bar -> py::foo chain"
    fi
    say "make demo passed in a fresh $FRESH_SUITE root in $((SECONDS - start)) s: py::baz -> py::bar -> py::foo"
    rm -rf --one-file-system "$root"
}

# ------------------------------------------------------------ check-deb

# make deb's packages on a fresh bookworm with Debian's python3.11: the
# upgrade, perf with both backends, numpy, apt, and the way back
# (driver/check_deb_root.sh).
cmd_check_deb() {
    STEP=check-deb
    ls "$DEB_DIR"/*.deb >/dev/null 2>&1 ||
        die "no packages in build/deb: run make deb first"
    local root=$BUILD/deb-root
    enter_fresh_root "$root"
    mkdir -p "$root/root/debs"
    cp "$DEB_DIR"/*.deb "$root/root/debs/"
    cp "$ROOT/driver/seed.py" "$root/root/seed.py"
    cp "$ROOT/driver/check_deb_root.sh" "$ROOT/driver/report_excerpt.py" \
        "$root/root/"
    local start=$SECONDS status=0
    in_fresh_root "$root" 'bash /root/check_deb_root.sh' || status=$?
    cp "$root/root/check-deb.log" "$LOGS/check-deb.log" 2>/dev/null || true
    leave_fresh_root "$root"
    [ "$status" = 0 ] || die "the packages failed in the fresh root (log: build/logs/check-deb.log)"
    say "passed in a fresh $FRESH_SUITE root in $((SECONDS - start)) s"
    rm -rf --one-file-system "$root"
}

# ---------------------------------------------------------------- dist

# The series and our new files as one diff against the pristine tree.
cmd_dist() {
    upstream_source
    local src=$SRC
    STEP=dist
    mkdir -p "$LOGS" "$ROOT/dist"
    local work=$BUILD/dist-work
    rm -rf "$work"
    unpack "$src" "$work/a"
    unpack "$src" "$work/b"
    copy_new_files "$work/b"
    apply_series "$work/b" >/dev/null
    local out=$ROOT/dist/python3.11-perf.patch
    {
        echo "Description: Linux perf support (python -X perf) for CPython 3.11"
        echo " Generated by 'make dist' from the cpython-perf series:"
        series | sed 's/^/   /'
        echo " configure and pyconfig.h.in are included: regenerating them"
        echo " (autoconf, autoreconf) is optional.  The Misc/NEWS.d entries"
        echo " are left out: their directories' names hold spaces, which"
        echo " dpkg-source refuses in a patch."
        echo "Forwarded: not-needed"
        echo "---"
        (cd "$work" && diff -Naur -x NEWS.d a b) || [ $? = 1 ]
    } >"$out"
    rm -rf "$work"
    say "wrote dist/python3.11-perf.patch ($(grep -c '^+++ ' "$out") files)"
}

# ------------------------------------------------------------- install

cmd_install() {
    STEP=install
    local prefix=${PREFIX:-/usr/local}
    local obj
    obj=$(patched_obj)
    [ -x "$BUILD/$obj/python" ] || die "nothing built; run make first"
    say "make altinstall prefix=$prefix (never replaces python3)"
    run install make -C "$BUILD/$obj" altinstall \
        prefix="$prefix" exec_prefix="$prefix"
    say "installed $prefix/bin/python3.11"
}

# ---------------------------------------------------------------- demo

cmd_demo() {
    STEP=demo
    local demo=$BUILD/demo python
    python=$BUILD/$(patched_python)
    mkdir -p "$demo"
    if ! "$python" -c 'import sysconfig, sys
sys.exit(not sysconfig.get_config_var("PY_HAVE_PERF_TRAMPOLINE"))'; then
        say "perf support is not built into this interpreter yet"
        return
    fi
    cp "$ROOT/driver/seed.py" "$demo/seed.py"
    say "perf record -F 9999 -g build/$(patched_python) -X perf seed.py"
    run demo perf record -F 9999 -g -o "$demo/perf.data" \
        "$python" -X perf "$demo/seed.py"
    say "perf report --stdio -n -g (the py:: chain of the hottest stack):"
    perf report --stdio -n -g caller --no-children -i "$demo/perf.data" \
        >"$demo/report.txt" 2>"$LOGS/demo-report.log"
    "$python" "$ROOT/driver/report_excerpt.py" "$demo/report.txt"
    say "Python-only folded stacks (Tools/perf/pystacks.py), top 5:"
    perf script -i "$demo/perf.data" 2>>"$LOGS/demo-report.log" \
        | "$python" "$ROOT/Tools/perf/pystacks.py" \
            --speedscope "$demo/profile.speedscope.json" >"$demo/folded.txt"
    head -n 5 "$demo/folded.txt"
    say "wrote build/demo/profile.speedscope.json (open: npx speedscope FILE)"
}

# ------------------------------------------------------------- viewers

# npm_install NAME@VERSION...: those not yet in $VIEWERS/npm, exactly.
npm_install() {
    local spec missing=
    for spec in "$@"; do
        grep -qs "\"version\": \"${spec##*@}\"" \
            "$VIEWERS/npm/node_modules/${spec%@*}/package.json" ||
            missing="$missing $spec"
    done
    [ -n "$missing" ] || return 0
    say "npm install$missing (into $VIEWERS/npm)"
    mkdir -p "$VIEWERS/npm"
    # shellcheck disable=SC2086
    run "$STEP" npm install --prefix "$VIEWERS/npm" --save-exact --no-audit \
        --no-fund $missing
}

# pprof from Debian's packaged source, offline: GOPATH mode finds the
# source and its two dependencies under /usr/share/gocode.
build_pprof() {
    [ -x "$VIEWERS/pprof" ] && return
    say "go build github.com/google/pprof (Debian's source) -> $VIEWERS/pprof"
    mkdir -p "$VIEWERS"
    run "$STEP" env GOPATH=/usr/share/gocode GO111MODULE=off GOFLAGS= \
        GOCACHE="$VIEWERS/go-build" go build -o "$VIEWERS/pprof" \
        github.com/google/pprof
}

cmd_viewers() {
    STEP=viewers
    # shellcheck disable=SC2086
    install_packages $VIEWER_PACKAGES
    # Any node with npm will do (Debian's, or one installed otherwise).
    command -v npm >/dev/null || install_packages nodejs npm
    # shellcheck disable=SC2086
    npm_install $VIEWER_NPM
    build_pprof
}

# speedscope showing pystacks' profile of the seed in headless chromium
# (tests/check_browser.py); screenshots in build/browser.
cmd_check_browser() {
    cmd_viewers
    STEP=check-browser
    # The emoji font: speedscope's tabs and buttons carry emoji, which
    # a desktop shows and a bare chromium draws as empty boxes.
    install_packages chromium fonts-noto-color-emoji
    # shellcheck disable=SC2086
    npm_install $BROWSER_NPM
    "$BUILD/obj/python" "$ROOT/tests/check_browser.py"
    say "screenshots: build/browser/time-ordered.png, left-heavy.png, sandwich.png"
}

# ---------------------------------------------------------------- docs

# CPython's documentation, with Debian's Sphinx and its stock theme (the
# python-docs-theme is not packaged): build/doc/html.
cmd_docs() {
    STEP=docs
    say "sphinx-build build/src/Doc -> build/doc/html"
    run docs /usr/bin/python3 -m sphinx -b html -q -j "$JOBS" \
        -D html_theme=classic "$BUILD/src/Doc" "$BUILD/doc/html"
    say "open build/doc/html/c-api/perfmaps.html"
}

main() {
    local cmd=${1:-}
    STEP=${cmd:-driver}
    case $cmd in
        deps | fetch | prepare | build | debug | asan | stock | cross | dist \
            | install | demo | docs | anchor | viewers)
            "cmd_$cmd" ;;
        check-browser) cmd_check_browser ;;
        regen-configure) cmd_regen_configure ;;
        debian-source) cmd_debian_source "${2:-}" ;;
        deb) cmd_deb ;;
        deb-source) cmd_deb_source "${2:-}" ;;
        check-fresh) cmd_check_fresh ;;
        check-deb) cmd_check_deb ;;
        *) die "usage: $0 deps|fetch|prepare|build|debug|asan|stock|cross|anchor|dist|install|demo|docs|viewers|check-browser|regen-configure|debian-source DEST|check-fresh|deb|deb-source DEST|check-deb" ;;
    esac
}

# Braces: bash has read the whole call before it runs, so editing this file
# while it runs cannot make it read and run a tail of the new text.
{ main "$@"; exit; }
