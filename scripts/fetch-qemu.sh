#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Fetch and unpack the pinned QEMU source: Debian's qemu 1:10.2.2+ds-1.
#
# Usage: fetch-qemu.sh DESTDIR
# Looks for the three source package files in, in order:
#   $ADD_COW_QEMU_CACHE (CI points it at ../shared/qemu),
#   the local download cache $ADD_COW_DL (default: .cache/dl),
#   the pool of the Debian mirror(s) named in the machine's apt sources.
# The pool is read directly rather than through apt-get source: 10.2.2 is
# not in Debian 12's suites, and a deb-src entry for unstable would change
# the system's apt state.  The files stay in the pool as long as any suite
# still carries this version.
# Every sha256 (the .dsc's too) is verified; a mismatch is a hard error.
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
    [$DSC]=f1684b3aa5ec500c3389d346c6501dee45041ea91656c6556d4da9023b7987dd
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

# The Debian archives the apt sources name, main archive first: from the
# index targets when "apt-get update" has run, else from the InRelease URIs
# that an update would fetch.  Nothing is written to the system's apt state.
mirrors() {
    {
        # shellcheck disable=SC2016
        apt-get indextargets --format '$(REPO_URI)' 'Label: Debian' \
            'Identifier: Packages' 2>/dev/null || true
        apt-get --print-uris update 2>/dev/null |
            sed -n "s|^'\(.*\)/dists/[^/]*/InRelease' .*|\1|p" || true
    } | sed 's|/*$||' | awk 'NF && !seen[$0]++'
}

hint() {
    cat >&2 <<EOF
fetch-qemu: when the mirror no longer has this version, get the three files
fetch-qemu:   $DSC
fetch-qemu:   $ORIG
fetch-qemu:   $DEB
fetch-qemu: from any Debian archive that still does (e.g. Debian's snapshot
fetch-qemu: archive), put them in one directory and run again with
fetch-qemu:   ADD_COW_QEMU_CACHE=/that/directory
fetch-qemu: or set QEMU_SRC to an unpacked copy of the source package
fetch-qemu: (dpkg-source -x $DSC); see README.md, "Two commands".
EOF
}

tmp=
trap 'rm -rf "$tmp"' EXIT
download() {
    local base=$1 f
    tmp=$(mktemp -d "$dl/.partial.XXXXXX")
    # Run as root, apt downloads as user _apt, which must own the target
    if [ "$(id -u)" = 0 ] && id _apt >/dev/null 2>&1; then
        chown _apt "$tmp"
    fi
    for f in "$DSC" "$DEB" "$ORIG"; do
        if ! /usr/lib/apt/apt-helper download-file \
                "$base/pool/main/q/qemu/$f" "$tmp/$f" "SHA256:${SHA[$f]}"; then
            rm -rf "$tmp"
            return 1
        fi
    done
    mv -f "$tmp/$DSC" "$tmp/$DEB" "$tmp/$ORIG" "$dl/"
}

if [ -z "$src" ]; then
    found=
    for m in $(mirrors); do
        case $m in
        http://* | https://* | ftp://* | file:/*) ;;
        *) continue ;;
        esac
        echo "fetch-qemu: downloading qemu $VER from $m"
        if download "$m"; then
            found=1
            break
        fi
    done
    if [ -z "$found" ]; then
        echo "fetch-qemu: no Debian mirror in the apt sources has qemu" \
             "1:$VER in its pool" >&2
        hint
        exit 1
    fi
    src=$dl
fi

for f in "$DSC" "$ORIG" "$DEB"; do
    check "$src/$f"
done
if [ "$src" != "$dl" ]; then
    cp -f "$src/$ORIG" "$src/$DEB" "$src/$DSC" "$dl/"
fi

rm -rf "$dest"
mkdir -p "$(dirname "$dest")"
echo "fetch-qemu: unpacking qemu $VER into $dest"
# The .dsc signature cannot be checked offline; the sha256 pins above
# (the .dsc's and both tarballs') are what guarantee the source.
dpkg-source --no-check -x "$dl/$DSC" "$dest" >/dev/null
touch "$dest/.add-cow-unpacked"
