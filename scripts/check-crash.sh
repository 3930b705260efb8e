#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# The long crash-state run: every workload at cluster sizes 512, 4k and 64k,
# exhaustive up to 2^12 states per crash point, 64 random samples beyond,
# up to 20000 distinct states per workload.  Prints the figures.
# make check runs the quick version as the iotest add-cow-crash.
#
# The negative controls are mutants of the driver
# (tests/qemu-iotests/tests/add-cow-mutants/*.patch, built by
# scripts/build-mutant.sh): the crash checker runs the partial-alloc
# workload with each and must find violating crash states, and
# add-cow-faults must fail against each (the cases whose output differs
# from the run without a mutant, which must match the reference, are
# counted).  A mutant that does not build fails the run.
#
# Usage: check-crash.sh [add_cow_crash.py options, e.g. --cluster-sizes 4096]
# Environment: BUILD_DIR, the ADD_COW_CRASH_* bounds of
# tests/qemu-iotests/tests/add_cow_crash.py, and ADD_COW_CRASH_FAULTS=0 to
# leave out the add-cow-faults runs.

set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
build=$(cd "${BUILD_DIR:-$top/.build/build}" && pwd)
tests=$top/tests/qemu-iotests/tests

status=0
mutants=$(BUILD_DIR=$build "$top/scripts/build-mutant.sh" --all) || {
    echo "check-crash: a mutant of the driver did not build" >&2
    status=1
}

python3 "$tests/add_cow_crash.py" --long --build "$build" \
    --mutants "$build/add-cow-mutants" "$@" || status=1

[ "${ADD_COW_CRASH_FAULTS:-1}" = 0 ] && exit $status

# The reference output holds one block per case: a line naming the case,
# then its indented results.  Prints "N of M cases differ" between the
# outputs $1 and $2; fails if none does.
count_cases() {
    python3 - "$1" "$2" <<'EOF'
import sys


def cases(path):
    out, name = {}, None
    try:
        lines = open(path, encoding='utf-8').read().splitlines()
    except FileNotFoundError:
        lines = []
    for line in lines:
        if not line.startswith(' '):
            name = line
            out[name] = []
        elif name is not None:
            out[name].append(line)
    return out


ref, bad = cases(sys.argv[1]), cases(sys.argv[2])
diff = [k for k, v in ref.items() if bad.get(k) != v]
# by fault: the case name up to its colon
kinds = {}
for k in diff:
    kind = k.split(':')[0]
    kinds[kind] = kinds.get(kind, 0) + 1
print(f'{len(diff)} of {len(ref)} cases differ' +
      (' (' + '; '.join(f'{k}: {n}' for k, n in kinds.items()) + ')'
       if diff else ''))
sys.exit(0 if diff else 1)
EOF
}

# Runs add-cow-faults with the qemu-img and qemu-io in $1 (the build's if
# empty) and TEST_DIR $2, copies its output to $2/out, returns its status
run_faults() {
    local tools=() rc=0 bad
    if [ -n "$1" ]; then
        tools=("QEMU_IMG_PROG=$1/qemu-img" "QEMU_IO_PROG=$1/qemu-io")
    fi
    (cd "$build/tests/qemu-iotests" &&
     env TEST_DIR="$2" "${tools[@]}" ./check -add-cow add-cow-faults) \
        >"$2/check.log" 2>&1 || rc=$?
    bad=$(find "$2" -name add-cow-faults.out.bad | head -1)
    cp "${bad:-$tests/add-cow-faults.out}" "$2/out"
    return $rc
}

# The cases of each mutant are counted against the output of the driver
# without a mutant, which must match the reference
echo "== add-cow-faults without a mutant, then against each (must fail)"
base=$(mktemp -d "$top/.build/faults-base.XXXXXX")
if run_faults "" "$base"; then
    echo "add-cow-faults, no mutant: ok"
else
    echo "add-cow-faults, no mutant: FAIL," \
         "$(count_cases "$tests/add-cow-faults.out" "$base/out")" \
         "from the reference; see $base/check.log"
    status=1
fi
for m in $mutants; do
    name=$(basename "$(dirname "$m")")
    scratch=$(mktemp -d "$top/.build/faults-$name.XXXXXX")
    if run_faults "$m" "$scratch"; then
        echo "add-cow-faults, mutant $name: FAIL: the test passed"
        status=1
    elif n=$(count_cases "$base/out" "$scratch/out"); then
        echo "add-cow-faults, mutant $name: caught, $n"
    else
        echo "add-cow-faults, mutant $name: FAIL: the test failed, but" \
             "no case differs from the run without a mutant;" \
             "see $scratch/check.log"
        status=1
        continue
    fi
    rm -rf "$scratch"
done
[ "$status" -ne 0 ] || rm -rf "$base"
exit $status
