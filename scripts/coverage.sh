#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Line and branch coverage of the add-cow driver (block/add-cow*.c) by its
# tests.  Used by "make coverage".
#
# Builds the binaries the add-cow iotests run (qemu-img, qemu-io, qemu-nbd,
# qemu-storage-daemon, qemu-system-x86_64, tests/unit/fuzz-add-cow) with
# --enable-gcov at -O0 in a build directory of their own (.build/gcov, same
# source tree .build/qemu), clears the counters, runs the tests through
# scripts/run-iotests.sh and reports with gcovr.  At -O0 every condition of
# the source is one branch point and every line keeps its own counter;
# optimised code merges and duplicates them.
#
# run-iotests.sh tests a copy of the binaries, which still counts into
# this build directory: each object's .gcda path is compiled in as an
# absolute path (the directory of the .o file).  Processes killed by a
# signal (the kill -9 crash tests) do not write their counts.
#
# Usage: coverage.sh [--build-only | --report-only] [SELECTION...]
#        coverage.sh --replay PATH...
#   SELECTION as for run-iotests.sh; default what "make check" runs: the
#   add-cow group, QEMU's quick group under -add-cow and the quick guest
#   scenarios.
#   --report-only reports the counters of the last run again.
#   --replay runs the inputs of a libFuzzer corpus (files, or directories
#   of them: scripts/fuzz.sh) once each through fuzz-add-cow --replay
#   instead of the tests, and reports in $GCOV_BUILD_DIR/coverage-replay.
# Environment: GCOV_BUILD_DIR (default .build/gcov), NICE (default 10).
# Output: the summary on stdout; in $GCOV_BUILD_DIR/coverage/: summary.txt,
# branches.txt, uncovered.txt (functions never entered, then lines and
# branches never taken, per file), coverage.json and an HTML report
# (index.html).

set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
src=${QEMU_SRC:-$top/.build/qemu}
build=${GCOV_BUILD_DIR:-$top/.build/gcov}
nice=${NICE:-10}
out=$build/coverage

mode=
case "${1:-}" in
--build-only|--report-only|--replay)
    mode=$1
    shift
    ;;
esac
if [ "$mode" = --replay ]; then
    out=$build/coverage-replay
    [ $# -gt 0 ] || { echo "coverage: --replay needs a corpus" >&2; exit 2; }
fi
if [ $# -eq 0 ]; then
    set -- "add-cow:-g add-cow" "add-cow:-g quick -x add-cow" "system:--quick"
fi

"$top/scripts/install-deps.sh" coverage

build() {
    "$top/scripts/install-deps.sh"
    # The overlay/patch step (and its lock) is shared with build.sh; the
    # build itself runs without the lock, which would otherwise stop every
    # other build and test run for the whole first build.
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
        # As scripts/build.sh, plus gcov at -O0
        (cd "$build" && nice -n "$nice" "$src/configure" --cc="$cc" \
            --python=/usr/bin/python3 --target-list=x86_64-softmmu \
            --enable-tools --enable-linux-aio --enable-linux-io-uring \
            --disable-docs --disable-rust --disable-install-blobs \
            --enable-gcov -Doptimization=0 >configure.log 2>&1) || {
            tail -30 "$build/configure.log" >&2
            echo "coverage: configure failed; see $build/configure.log" >&2
            exit 1
        }
    fi
    local targets="qemu-img qemu-io qemu-nbd storage-daemon/qemu-storage-daemon
 qemu-system-x86_64 tests/unit/fuzz-add-cow"
    # gcov reads the source when it reports: it must be what was compiled.
    # The tree is shared, and prepare-tree.sh may copy a new driver in at
    # any time: build until the driver did not change during the build.
    local try
    for try in 1 2 3; do
        src_sum >"$build/add-cow-src.sha256"
        # shellcheck disable=SC2086
        nice -n "$nice" ninja --quiet -C "$build" $targets
        if src_sum | cmp -s - "$build/add-cow-src.sha256"; then
            break
        fi
    done
    for t in $targets; do
        [ -x "$build/$t" ] || {
            echo "coverage: $t was not built" >&2
            exit 1
        }
    done
    if [ -f "$build/pc-bios/optionrom/config.mak" ]; then
        nice -n "$nice" make -s -C "$build/pc-bios/optionrom" >/dev/null
    fi
    "$top/scripts/link-firmware.sh" "$build"
}

src_sum() {
    (cd "$src" && sha256sum block/add-cow*.c)
}

# The driver as compiled is still the source gcovr reads
check_src() {
    if ! src_sum | cmp -s - "$build/add-cow-src.sha256"; then
        echo "coverage: block/add-cow*.c changed since it was compiled;" \
             "the counts no longer match the source: run again" >&2
        exit 1
    fi
}

report() {
    local gcovr_args
    mkdir -p "$out"
    check_src
    # Only the driver; branches of lines without code (compiler-made) are
    # left out; the source is the tree that was compiled
    gcovr_args=(-r "$src" --object-directory "$build"
                -f "$src/block/add-cow[^/]*\.c$"
                --exclude-unreachable-branches)
    (cd "$build" && gcovr "${gcovr_args[@]}" --json "$out/coverage.json" \
        --html-details "$out/index.html" --txt "$out/summary.txt" \
        --print-summary) >"$out/gcovr.log"
    (cd "$build" && gcovr "${gcovr_args[@]}" --branches \
        --txt "$out/branches.txt")
    # The same without the branches of assert() lines, whose failing side
    # is never taken by design
    (cd "$build" && gcovr "${gcovr_args[@]}" \
        --exclude-branches-by-pattern '^\s*(g_)?assert(_not_reached)?\(' \
        --json-summary "$out/summary-noassert.json")
    python3 "$top/scripts/coverage-report.py" "$out/coverage.json" \
        "$out/summary-noassert.json" "$src" >"$out/uncovered.txt"
    check_src
    src_sum >"$out/source.sha256"
    echo "== line coverage ($out/summary.txt)"
    sed -n '/^File/,$p' "$out/summary.txt"
    echo "== branch coverage ($out/branches.txt)"
    sed -n '/^File/,$p' "$out/branches.txt"
    sed -n '/^== totals/,$p' "$out/uncovered.txt"
    echo "coverage: uncovered functions, lines and branches:" \
         "$out/uncovered.txt; HTML: $out/index.html"
}

if [ "$mode" != --report-only ]; then
    build
    [ "$mode" = --build-only ] && exit 0
    # Zero the counters: only this run's tests count
    find "$build" -name '*.gcda' -delete
    status=0
    if [ "$mode" = --replay ]; then
        work=$build/replay-work
        rm -rf "$work"
        nice -n "$nice" "$build/tests/unit/fuzz-add-cow" --dir "$work" \
            --replay "$@" || status=$?
    else
        BUILD_DIR=$build IOTESTS_LOG_DIR=$build/iotests-logs \
            "$top/scripts/run-iotests.sh" "$@" || status=$?
    fi
    if [ "$status" -ne 0 ]; then
        echo "coverage: some tests failed; the figures below include the" \
             "runs that failed" >&2
    fi
fi
report
exit "${status:-0}"
