#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Install what building QEMU 10.2.2 with add-cow and running its tests needs
# on Debian 12 (bookworm).  Idempotent and quiet when everything is present.
#
# Usage: install-deps.sh [docs|coverage|fuzz]
#
# meson >= 1.5 comes from bookworm-backports.  The backports entry is derived
# from the machine's existing apt sources, so no mirror host is named here.

set -euo pipefail

PKGS="build-essential pkg-config ninja-build python3 python3-venv
 libglib2.0-dev libpixman-1-dev libaio-dev liburing-dev libfdt-dev zlib1g-dev
 libbz2-dev bzip2 xz-utils dpkg-dev seabios ipxe-qemu ccache gcc-multilib
 flex bison git perl python3-tomli"
# For the guest test (issue 8): kernel/busybox are fetched with apt-get download.
PKGS="$PKGS e2fsprogs"
# "install-deps.sh docs": also what QEMU's Sphinx manual needs (make docs)
if [ "${1:-}" = docs ]; then
    PKGS="$PKGS python3-sphinx python3-sphinx-rtd-theme"
fi
# "coverage": the report of the --enable-gcov build (make coverage)
if [ "${1:-}" = coverage ]; then
    PKGS="$PKGS gcovr"
fi
# "fuzz": clang with libFuzzer and the sanitizer runtimes (make fuzz)
if [ "${1:-}" = fuzz ]; then
    PKGS="$PKGS clang-14 libclang-rt-14-dev"
fi

SUDO=
if [ "$(id -u)" != 0 ]; then
    SUDO=sudo
fi

missing=
for p in $PKGS; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed"; then
        missing="$missing $p"
    fi
done

meson_ok() {
    command -v meson >/dev/null 2>&1 || return 1
    meson --version | awk -F. '{ exit !($1 > 1 || ($1 == 1 && $2 >= 5)) }'
}

if [ -z "$missing" ] && meson_ok; then
    exit 0
fi

# Derive a bookworm-backports entry from the existing sources.  (No deb-src
# entry: scripts/fetch-qemu.sh reads the QEMU source from the mirror's pool.)
add_backports() {
    local out=/etc/apt/sources.list.d/add-cow-backports.sources
    [ -f "$out" ] && return 0
    local uri=
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
        uri=$(awk '/^URIs:/ && $2 !~ /security/ { print $2; exit }' \
              /etc/apt/sources.list.d/debian.sources)
    fi
    if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
        uri=$(awk '$1 == "deb" && $0 !~ /security/ { for (i = 2; i <= NF; i++)
                  if ($i ~ /:\/\//) { print $i; exit } }' /etc/apt/sources.list)
    fi
    if [ -z "$uri" ]; then
        echo "install-deps: cannot find a Debian mirror in the apt sources" >&2
        exit 1
    fi
    $SUDO tee "$out" >/dev/null <<SRC
Types: deb
URIs: $uri
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
}

echo "install-deps: installing:${missing:- meson}"
add_backports
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
# shellcheck disable=SC2086
[ -z "$missing" ] || $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
if ! meson_ok; then
    $SUDO apt-get install -y -qq --no-install-recommends -t bookworm-backports meson >/dev/null
fi
meson_ok || { echo "install-deps: meson >= 1.5 not available" >&2; exit 1; }
