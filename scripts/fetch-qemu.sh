#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Fetch and unpack the pinned QEMU source: Debian's qemu 1:10.2.2+ds-1.
#
# Usage: fetch-qemu.sh DESTDIR
# Looks for the three source package files in, in order:
#   $ADD_COW_QEMU_CACHE (CI points it at ../shared/qemu),
#   the local download cache $ADD_COW_DL (default: .cache/dl),
#   apt-get source --download-only from the machine's Debian deb-src entries.
# Every sha256 is verified; a mismatch is a hard error.
# If $QEMU_SRC names an existing QEMU 10.2 tree, it is used instead.

set -euo pipefail

dest=${1:?usage: fetch-qemu.sh DESTDIR}
top=$(cd "$(dirname "$0")/.." && pwd)
dl=${ADD_COW_DL:-$top/.cache/dl}

VER=10.2.2+ds-1
ORIG=qemu_10.2.2+ds.orig.tar.xz
DEB=qemu_$VER.debian.tar.xz
DSC=qemu_$VER.dsc
declare -A SHA=(
    [$ORIG]=be05230fe47a6937cd29f28f562932c8125f9c93c2a82c625198f7a4aa601dfb
    [$DEB]=ddf75aceab4f8f77374f3cb34fc97b41514895aeb293ce8b2ddd5e072bb0f5c0
)

if [ -n "${QEMU_SRC:-}" ]; then
    if ! grep -q '^10\.2\.' "$QEMU_SRC/VERSION" 2>/dev/null; then
        echo "fetch-qemu: QEMU_SRC=$QEMU_SRC is not a QEMU 10.2 tree" >&2
        exit 1
    fi
    exit 0
fi

if [ -f "$dest/.add-cow-unpacked" ]; then
    exit 0
fi

check() {
    local f=$1 want=${SHA[$(basename "$1")]:-} got
    [ -n "$want" ] || return 0
    got=$(sha256sum "$f" | cut -d' ' -f1)
    if [ "$got" != "$want" ]; then
        echo "fetch-qemu: sha256 mismatch for $f" >&2
        echo "fetch-qemu:   expected $want" >&2
        echo "fetch-qemu:   got      $got" >&2
        echo "fetch-qemu: refusing to build from an unverified source package;" \
             "remove or replace $f and retry" >&2
        return 1
    fi
}

have_all() {
    local d=$1
    [ -f "$d/$ORIG" ] && [ -f "$d/$DEB" ] && [ -f "$d/$DSC" ]
}

mkdir -p "$dl"
src=
for d in ${ADD_COW_QEMU_CACHE:-} "$dl"; do
    if [ -n "$d" ] && have_all "$d"; then
        src=$d
        break
    fi
done

if [ -z "$src" ]; then
    echo "fetch-qemu: downloading qemu $VER with apt-get source"
    (cd "$dl" && apt-get source --download-only -qq "qemu=1:$VER") || {
        echo "fetch-qemu: apt-get source failed; is a deb-src entry enabled?" \
             "(scripts/install-deps.sh adds one)" >&2
        exit 1
    }
    src=$dl
fi

for f in "$ORIG" "$DEB"; do
    check "$src/$f"
done
if [ "$src" != "$dl" ]; then
    cp -f "$src/$ORIG" "$src/$DEB" "$src/$DSC" "$dl/"
fi

rm -rf "$dest"
mkdir -p "$(dirname "$dest")"
echo "fetch-qemu: unpacking qemu $VER into $dest"
# The .dsc signature cannot be checked offline; the tarballs' sha256 are
# pinned above, which is what guarantees the source.
dpkg-source --no-check -x "$dl/$DSC" "$dest" >/dev/null
touch "$dest/.add-cow-unpacked"
