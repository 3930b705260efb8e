#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# The long run of the differential operation-sequence tester
# (tests/qemu-iotests/tests/add_cow_ops.py): random sequences of
# operations on an add-cow chain and on a qcow2 chain over the same data,
# the guest-visible contents compared after every step, qcow2 being the
# oracle.  Runs for ADD_COW_OPS_MINUTES (default 20) or
# ADD_COW_OPS_SEQUENCES sequences of ADD_COW_OPS_STEPS (default 40)
# operations, seeds derived from ADD_COW_OPS_BASE_SEED (default 1), and
# prints the sequences run, the operations applied per kind with their
# outcomes, and every divergence with its seed.  ADD_COW_OPS_SEED=<seed>
# replays one sequence verbosely.  make check runs a short fixed-seed
# pass as the iotest add-cow-ops.
#
# Then the negative control: with the driver mutant ops/zero-fill-on-rename
# (tests/qemu-iotests/tests/add-cow-mutants/ops/, built by
# scripts/build-mutant-system.sh) the tester must find a divergence.
# ADD_COW_OPS_MUTANT=0 leaves it out.
#
# Usage: check-ops.sh [add_cow_ops.py options]
# Environment: BUILD_DIR, and the variables above.

set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
build=$(cd "${BUILD_DIR:-$top/.build/build}" && pwd)
ops=$top/tests/qemu-iotests/tests/add_cow_ops.py

if [ -z "${ADD_COW_OPS_SEQUENCES:-}${ADD_COW_OPS_MINUTES:-}" ]; then
    export ADD_COW_OPS_MINUTES=20
fi

status=0
echo "== add-cow against qcow2"
python3 "$ops" --build "$build" "$@" || status=1
if [ -n "${ADD_COW_OPS_SEED:-}" ] || [ "${ADD_COW_OPS_MUTANT:-1}" = 0 ]; then
    exit $status
fi

echo "== negative control: mutant ops/zero-fill-on-rename (must diverge)"
if sys=$(BUILD_DIR=$build "$top/scripts/build-mutant-system.sh" \
                          ops/zero-fill-on-rename); then
    QEMU_IMG_PROG=$sys/qemu-img QEMU_IO_PROG=$sys/qemu-io \
    QEMU_PROG=$sys/qemu-system-x86_64 ADD_COW_OPS_MINUTES='' \
    ADD_COW_OPS_SEQUENCES=30 \
        python3 "$ops" --build "$build" --until-divergence "$@" || status=1
else
    echo "check-ops: the mutant did not build" >&2
    status=1
fi
exit $status
