#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Entry point of "make check-system" (all scenarios) and of the guest part
# of "make check" (--quick: write + reboot and crash).  Arguments are passed
# to check-system.py; see its header.  Needs a finished scripts/build.sh
# (QEMU binaries plus the firmware it links into the build's qemu-bundle).
#
# Environment: QEMU_BUILD (default .build/build), GUEST_DIR (default
# .build/guest), CHECK_SYSTEM_FORMAT (default add-cow).

set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
build=${QEMU_BUILD:-$top/.build/build}
export QEMU_BUILD=$build

# Host tools: e2fsprogs (mkfs.ext4 -d, e2fsck, debugfs), dpkg-deb and
# apt-get (to fetch and unpack the kernel and busybox packages).
need=
for t in mkfs.ext4:e2fsprogs e2fsck:e2fsprogs debugfs:e2fsprogs \
         dpkg-deb:dpkg apt-get:apt flock:util-linux; do
    command -v "${t%%:*}" >/dev/null 2>&1 || need="$need ${t#*:}"
done
if [ -n "$need" ]; then
    if [ "$(id -u)" = 0 ]; then
        echo "check-system: installing$need" >&2
        # shellcheck disable=SC2086
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends $need >/dev/null
    else
        echo "check-system: missing packages:$need" >&2
        exit 1
    fi
fi

for b in qemu-system-x86_64 qemu-img qemu-io storage-daemon/qemu-storage-daemon; do
    if [ ! -x "$build/$b" ]; then
        echo "check-system: $build/$b missing; run scripts/build.sh" >&2
        exit 1
    fi
done
fw=$build/qemu-bundle/usr/local/share/qemu
for f in bios-256k.bin linuxboot_dma.bin; do
    if [ ! -e "$fw/$f" ]; then
        echo "check-system: firmware $fw/$f missing; run scripts/build.sh" >&2
        exit 1
    fi
done

py=python3
[ -x /usr/bin/python3 ] && py=/usr/bin/python3
exec "$py" "$here/check-system.py" "$@"
