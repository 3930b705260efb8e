#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Run qemu-iotests against the add-cow build and print one closing line:
#   N passed, N failed[, N skipped]
#
# Usage: run-iotests.sh [SELECTION...]
# Each SELECTION is "FMT:ARGS", run as `./check -FMT ARGS`, or
# "system:ARGS", run as `scripts/guest/check-system.sh ARGS`; the default
# is the add-cow group plus QEMU's generic quick group, both under -add-cow.
# Exit status is non-zero if any test failed.
# Environment: BUILD_DIR (default .build/build), IOTESTS_LOG_DIR (default
# .build/iotests-logs).

set -uo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
build=${BUILD_DIR:-$top/.build/build}
dir=$build/tests/qemu-iotests
logdir=${IOTESTS_LOG_DIR:-$top/.build/iotests-logs}
mkdir -p "$logdir"

if [ $# -eq 0 ]; then
    set -- "add-cow:-g add-cow" "add-cow:-g quick -x add-cow"
fi

# The mutants of the driver, the negative controls of add-cow-crash: built
# here (seconds, nothing when unchanged), so that a mutant patch that no
# longer applies fails that test, loudly, instead of the whole run.
if ! BUILD_DIR=$build "$top/scripts/build-mutant.sh" --all >/dev/null; then
    echo "run-iotests: a mutant of the driver did not build;" \
         "add-cow-crash will fail"
fi

# Test a snapshot of the binaries: other builds in this tree (several
# people, one build directory) may relink them while the tests run, which
# makes a running test fail with "Permission denied" or "Text file busy".
# The copy is taken under scripts/build.sh's lock, so it is never half
# linked.  qemu-system finds its firmware through the qemu-bundle link.
bin=$top/.build/iotests-bin/$$
rm -rf "$bin"
mkdir -p "$bin"
trap 'rm -rf "$bin"' EXIT
(
    flock 9
    for b in qemu-img qemu-io qemu-nbd storage-daemon/qemu-storage-daemon \
             qemu-system-x86_64; do
        cp "$build/$b" "$bin/" || exit 1
    done
    # add-cow-fuzz-inproc looks for the harness beside qemu-img
    mkdir -p "$bin/tests/unit"
    cp "$build/tests/unit/fuzz-add-cow" "$bin/tests/unit/" || exit 1
    # add-cow-crash looks for the mutants there too
    for m in "$build"/add-cow-mutants/*/bin; do
        [ -d "$m" ] || continue
        mdir=$bin/add-cow-mutants/$(basename "$(dirname "$m")")/bin
        mkdir -p "$mdir"
        cp "$m/qemu-img" "$m/qemu-io" "$mdir/" || exit 1
    done
) 9>"$top/.build/.build-lock" || {
    echo "run-iotests: the binaries in $build are missing; run make build"
    echo "0 passed, 1 failed"
    exit 1
}
ln -s "$build/qemu-bundle" "$bin/qemu-bundle"
export QEMU_PROG=$bin/qemu-system-x86_64 QEMU_IMG_PROG=$bin/qemu-img \
       QEMU_IO_PROG=$bin/qemu-io QEMU_NBD_PROG=$bin/qemu-nbd \
       QSD_PROG=$bin/qemu-storage-daemon

pass=0
fail=0
skip=0
failed_names=
for sel in "$@"; do
    fmt=${sel%%:*}
    args=${sel#*:}
    if [ "$fmt" = system ]; then
        # The real-guest scenarios: one test per scenario
        log=$logdir/system.log
        echo "== scripts/guest/check-system.sh $args"
        # shellcheck disable=SC2086
        QEMU_BUILD=$build "$top/scripts/guest/check-system.sh" $args \
            >"$log" 2>&1
        rc=$?
        grep -E '^\[[a-z-]+\].*(PASS|FAIL)' "$log" | sed 's/^/   /'
        line=$(grep -Eo '[0-9]+/[0-9]+ scenarios passed' "$log" | tail -1)
        if [ -n "$line" ]; then
            p=${line%%/*}
            t=${line#*/}
            t=${t%% *}
            f=$((t - p))
        else
            p=0
            f=1
        fi
        if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
            f=1
        fi
        if [ "$f" -gt 0 ]; then
            failed_names="$failed_names system"
            tail -30 "$log"
        fi
        echo "   ($p passed, $f failed; log: $log)"
        pass=$((pass + p))
        fail=$((fail + f))
        continue
    fi
    name=$(echo "$fmt $args" | tr -c 'a-zA-Z0-9\n' '_')
    # A long list of tests: a short name made unique by a hash of the list
    if [ ${#name} -gt 80 ]; then
        name=${name:0:60}_$(echo "$args" | sha256sum | cut -c1-12)
    fi
    log=$logdir/$name.log
    echo "== ./check -$fmt $args"
    # A scratch directory of our own, so that a concurrent ./check by hand
    # (default TEST_DIR) does not share image files with this run.
    scratch=$top/.build/iotests-scratch/$$-$(basename "$log" .log)
    rm -rf "$scratch"
    mkdir -p "$scratch"
    # shellcheck disable=SC2086
    (cd "$dir" && TEST_DIR=$scratch ./check -tap -$fmt $args) \
        >"$log" 2>"$log.diff"
    rc=$?
    # TAP from testrunner.py: "1..N", then per test "ok FMT NAME",
    # "not ok FMT NAME" or "ok FMT NAME # SKIP" (not run)
    n=$(sed -n 's/^1\.\.\([0-9][0-9]*\)$/\1/p' "$log" | head -1)
    p=$(grep '^ok ' "$log" | grep -vc '# SKIP$' || true)
    s=$(grep -c '^ok .*# SKIP$' "$log" || true)
    f=$(grep -c '^not ok ' "$log" || true)
    if [ -z "$n" ]; then
        echo "run-iotests: ./check -$fmt $args did not run (see $log)"
        tail -n 5 "$log" "$log.diff"
        f=$((f + 1))
    elif [ $((p + s + f)) -lt "$n" ]; then
        echo "run-iotests: ./check -$fmt $args stopped after" \
             "$((p + s + f)) of $n tests (exit status $rc; see $log)"
        tail -n 5 "$log.diff"
        f=$((f + n - p - s - f))
    elif [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
        echo "run-iotests: ./check -$fmt $args exited with status $rc"
        tail -n 5 "$log.diff"
        f=1
    fi
    if [ "$f" -eq 0 ]; then
        rm -rf "$scratch"
    fi
    grep -E '^(not )?ok ' "$log" | grep -v '# SKIP$' | sed 's/^/   /'
    if [ "$f" -gt 0 ]; then
        failed_names="$failed_names $(grep '^not ok ' "$log" |
                                       awk '{print $4}' | tr '\n' ' ')"
        sed -n '1,200p' "$log.diff"
    fi
    echo "   ($p passed, $f failed, $s skipped; log: $log)"
    pass=$((pass + p))
    fail=$((fail + f))
    skip=$((skip + s))
done

# shellcheck disable=SC2086
failed_names=$(echo $failed_names)
if [ -n "$failed_names" ]; then
    echo "Failed tests: $failed_names"
fi
if [ "$skip" -gt 0 ]; then
    echo "$pass passed, $fail failed, $skip skipped"
else
    echo "$pass passed, $fail failed"
fi
[ "$fail" -eq 0 ]
