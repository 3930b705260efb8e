#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Configure (once) and build QEMU with add-cow out of tree in .build/build.
# Re-running it after an edit rebuilds incrementally.
#
# Environment: BUILD_DIR (default .build/build), QEMU_SRC, EXTRA_CONFIGURE.

set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
src=${QEMU_SRC:-$top/.build/qemu}
build=${BUILD_DIR:-$top/.build/build}

"$top/scripts/install-deps.sh"

# One build at a time: several test runners may call this concurrently.
mkdir -p "$top/.build"
exec 9>"$top/.build/.build-lock"
flock 9

"$top/scripts/prepare-tree.sh"

# tests/unit/fuzz-add-cow: the in-process fuzzer (add-cow-fuzz-inproc)
TARGETS="qemu-img qemu-io qemu-nbd storage-daemon/qemu-storage-daemon
 qemu-system-x86_64 tests/unit/fuzz-add-cow"

if [ ! -f "$build/build.ninja" ]; then
    mkdir -p "$build"
    cc=cc
    if command -v ccache >/dev/null 2>&1; then
        cc="ccache cc"
    fi
    # shellcheck disable=SC2086
    (cd "$build" && "$src/configure" --cc="$cc" --python=/usr/bin/python3 \
        --target-list=x86_64-softmmu --enable-tools \
        --enable-linux-aio --enable-linux-io-uring \
        --disable-docs --disable-rust --disable-install-blobs \
        ${EXTRA_CONFIGURE:-} >configure.log 2>&1) || {
        tail -30 "$build/configure.log" >&2
        echo "build: configure failed; see $build/configure.log" >&2
        exit 1
    }
fi

# shellcheck disable=SC2086
ninja --quiet -C "$build" $TARGETS
for t in $TARGETS; do
    [ -x "$build/$t" ] || { echo "build: $t was not built" >&2; exit 1; }
done
# The optional ROMs (kvmvapic.bin, linuxboot_dma.bin) built from source
# when configure found an i386-capable compiler.
if [ -f "$build/pc-bios/optionrom/config.mak" ]; then
    make -s -C "$build/pc-bios/optionrom" >/dev/null
fi
"$top/scripts/link-firmware.sh" "$build"
