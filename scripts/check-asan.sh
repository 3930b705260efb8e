#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Build qemu-img/qemu-io/qemu-nbd with AddressSanitizer and
# UndefinedBehaviorSanitizer in a separate build directory
# (.build/build-asan, same source tree .build/qemu) and run the add-cow
# iotests group against it.  Used by "make check-asan".
#
# Usage: scripts/check-asan.sh [--build-only] [iotest names...]
# Environment: ASAN_BUILD_DIR (default .build/build-asan), NICE (default 10),
# ASAN_SYSTEM=1 to build and use a sanitized qemu-system-x86_64 too.

set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
src=${QEMU_SRC:-$top/.build/qemu}
build=${ASAN_BUILD_DIR:-$top/.build/build-asan}
nice=${NICE:-10}

build_only=
if [ "${1:-}" = "--build-only" ]; then
    build_only=1
    shift
fi

"$top/scripts/install-deps.sh"

# Share the overlay/patch step (and its lock) with scripts/build.sh.
mkdir -p "$top/.build"
(
    exec 9>"$top/.build/.build-lock"
    flock 9
    "$top/scripts/prepare-tree.sh"
)

if [ ! -f "$build/build.ninja" ]; then
    mkdir -p "$build"
    cc=cc
    if command -v ccache >/dev/null 2>&1; then
        cc="ccache cc"
    fi
    (cd "$build" && nice -n "$nice" "$src/configure" --python=/usr/bin/python3 \
        --cc="$cc" --target-list=x86_64-softmmu --enable-tools \
        --disable-docs --disable-rust --disable-install-blobs \
        --enable-asan --enable-ubsan >configure.log 2>&1) || {
        tail -30 "$build/configure.log" >&2
        echo "check-asan: configure failed; see $build/configure.log" >&2
        exit 1
    }
fi

# tests/unit/fuzz-add-cow: the in-process fuzzer (add-cow-fuzz-inproc)
TARGETS="qemu-img qemu-io qemu-nbd storage-daemon/qemu-storage-daemon
 tests/unit/fuzz-add-cow"
if [ -n "${ASAN_SYSTEM:-}" ]; then
    TARGETS="$TARGETS qemu-system-x86_64"
fi
# shellcheck disable=SC2086
nice -n "$nice" ninja --quiet -C "$build" $TARGETS
for t in $TARGETS; do
    [ -x "$build/$t" ] || { echo "check-asan: $t was not built" >&2; exit 1; }
done
[ -n "$build_only" ] && exit 0

# add-cow-crash runs its negative controls with mutants of the driver,
# built beside qemu-img
if ! BUILD_DIR=$build "$top/scripts/build-mutant.sh" --all >/dev/null; then
    echo "check-asan: a mutant of the driver did not build;" \
         "add-cow-crash will fail" >&2
fi

# Sanitizer output goes to log files, not stderr: ASan warns on stderr
# about swapcontext (coroutines) in every process, which would break every
# reference output.  The iotests runner sets ASAN_OPTIONS itself
# (detect_leaks=0, log_path=TEST_DIR/<test>.out.asan, removed when the test
# passes); ASan errors are fatal anyway.  UBSan reports are made fatal
# (abort) and logged here.  Every report found is listed after the run,
# which then fails.
logs="$build/sanitizer-logs"
scratch="$build/tests/qemu-iotests/scratch"
rm -rf "$logs"
mkdir -p "$logs"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:print_summary=1:log_path=$logs/asan}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1:abort_on_error=1:log_path=$logs/ubsan}
find "$scratch" -name '*.out.asan*' -delete 2>/dev/null || true

# The add-cow tests run the tools; the few VM-based ones use qemu-system,
# which takes long to build with sanitizers: unless ASAN_SYSTEM=1, use the
# regular build's (scripts/build.sh).
if [ -z "${ASAN_SYSTEM:-}" ] && [ -z "${QEMU_PROG:-}" ]; then
    if [ ! -x "$top/.build/build/qemu-system-x86_64" ]; then
        "$top/scripts/build.sh"
    fi
    export QEMU_PROG="$top/.build/build/qemu-system-x86_64"
fi

cd "$build/tests/qemu-iotests"
status=0
if [ $# -gt 0 ]; then
    ./check -add-cow "$@" || status=$?
else
    ./check -add-cow -g add-cow || status=$?
fi

reports=$( (find "$logs" -type f; find "$scratch" -name '*.out.asan*') |
          xargs -r grep -lE \
              'ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:' \
              2>/dev/null || true)
if [ -n "$reports" ]; then
    for f in $reports; do
        echo "=== $f"
        cat "$f"
    done
    echo "check-asan: sanitizer reports in $(echo "$reports" | wc -l)" \
         "log file(s)" >&2
    exit 1
fi
echo "check-asan: no sanitizer report"
exit $status
