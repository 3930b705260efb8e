#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Make every firmware file and option ROM the x86 "pc" machine loads visible
# to the freshly built qemu-system-x86_64, which (being relocatable) searches
# BUILD/qemu-bundle/usr/local/share/qemu.  The +ds source ships no blobs:
# SeaBIOS and iPXE come from Debian's packages, the x86 option ROMs are built
# from pc-bios/optionrom (or taken from Debian's qemu-system-data if present).

set -euo pipefail

build=$(cd "${1:?usage: link-firmware.sh BUILD_DIR}" && pwd)
dir=$build/qemu-bundle/usr/local/share/qemu
mkdir -p "$dir"

link() {
    # link SOURCE: replace a stale link, never a real file
    local f=$1 t
    t=$dir/$(basename "$f")
    [ -e "$f" ] || return 0
    if [ -L "$t" ] || [ ! -e "$t" ]; then
        ln -sfn "$f" "$t"
    fi
}

for f in /usr/share/seabios/*.bin; do
    link "$f"
done
for f in /usr/lib/ipxe/qemu/*.rom; do
    link "$f"
done
for r in kvmvapic.bin linuxboot.bin linuxboot_dma.bin multiboot.bin \
         multiboot_dma.bin pvh.bin; do
    if [ -f "$build/pc-bios/optionrom/$r" ]; then
        link "$build/pc-bios/optionrom/$r"
    elif [ -f "/usr/share/qemu/$r" ]; then
        link "/usr/share/qemu/$r"
    fi
done

missing=
for r in bios-256k.bin kvmvapic.bin linuxboot_dma.bin vgabios-stdvga.bin \
         efi-e1000.rom; do
    [ -e "$dir/$r" ] || missing="$missing $r"
done
if [ -n "$missing" ]; then
    echo "link-firmware: missing firmware:$missing" >&2
    exit 1
fi
