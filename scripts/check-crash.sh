#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# The long crash-state run: every workload at cluster sizes 512, 4k and 64k,
# exhaustive up to 2^12 states per crash point, 64 random samples beyond,
# up to 20000 distinct states per workload.  Prints the figures.
# make check runs the quick version as the iotest add-cow-crash.
#
# Environment: BUILD_DIR, and the ADD_COW_CRASH_* bounds of
# tests/qemu-iotests/tests/add_cow_crash.py.

set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
build=${BUILD_DIR:-$top/.build/build}
exec python3 "$top/tests/qemu-iotests/tests/add_cow_crash.py" --long \
    --build "$build" "$@"
