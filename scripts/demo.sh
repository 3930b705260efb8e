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
# The freshly built tools come first in PATH, so the commands below read
# as a user would type them
export PATH=$build:$PATH
img=qemu-img
io=qemu-io

rm -rf "$dir"
mkdir -p "$dir"
cd "$dir"

step() {
    # Show the command as one would type it: arguments with blanks in quotes
    local a
    printf '\n$'
    for a in "$@"; do
        case "$a" in
            *[!A-Za-z0-9_./=:,+-]*) printf " '%s'" "$a" ;;
            *) printf ' %s' "$a" ;;
        esac
    done
    printf '\n'
    "$@"
}

echo "== add-cow demo in $dir (qemu-img, qemu-io: $build)"
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
