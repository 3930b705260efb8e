#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# The main job, as a new user would do it: a base image with data, an
# add-cow overlay over it, writes through the overlay, then what qemu-img
# says about the result.

set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
build=${BUILD_DIR:-$top/.build/build}
dir=$top/.build/demo
img=$build/qemu-img
io=$build/qemu-io

rm -rf "$dir"
mkdir -p "$dir"
cd "$dir"

step() {
    printf '\n$'; printf ' %q' "$@"; printf '\n'
    "$@"
}

echo "== add-cow demo in $dir"
step "$img" create -f raw base.raw 64M
step "$io" -f raw -c "write -P 0xb0 0 64M" base.raw
step "$img" create -f add-cow -b base.raw -F raw overlay.add-cow
step "$io" -c "write -P 0x11 4k 8k" -c "write -P 0x22 1M 3M" \
    -c "read -P 0xb0 0 4k" -c "read -P 0x11 4k 8k" -c "read -P 0xb0 12k 52k" \
    overlay.add-cow
step "$img" info overlay.add-cow
step "$img" map overlay.add-cow
step "$img" check overlay.add-cow
step ls -ls base.raw overlay.add-cow overlay.add-cow.img
