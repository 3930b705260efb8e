#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Build the tiny test guest used by scripts/guest/check-system.py from
# Debian packages only: the kernel that linux-image-amd64 depends on and
# busybox-static, fetched with "apt-get download" (nothing else is
# downloaded) and unpacked with dpkg-deb -x.  The initramfs is written by
# busybox's own cpio and carries the virtio-blk and ext4 modules plus
# scripts/guest/init.
#
# Output (cached; rebuilt only when an input changes), in GUEST_DIR
# (default .build/guest):
#   vmlinuz          the kernel
#   initramfs.cpio   the initramfs (newc, uncompressed)
#   busybox          the static busybox (also usable on the host)
#
# Usage: build-guest.sh [--print-dir]

set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
out=${GUEST_DIR:-$top/.build/guest}
debs=$out/debs

# Module names wanted in the guest; their dependencies are added from the
# depends= and softdep= strings stored in each .ko.
WANT_MODULES="virtio_pci virtio_blk ext4"

log() { echo "build-guest: $*" >&2; }
die() { log "$*"; exit 1; }

mkdir -p "$debs"
exec 8>"$out/.lock"
flock 8

# ---------------------------------------------------------------- fetch
kernel_pkg() {
    # The versioned kernel package linux-image-amd64 depends on.
    apt-cache depends linux-image-amd64 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }'
}

fetch() {
    # fetch PACKAGE: make sure one .deb of PACKAGE is in $debs
    local pkg=$1
    if ls "$debs/${pkg}_"*.deb >/dev/null 2>&1; then
        return 0
    fi
    log "apt-get download $pkg"
    if ! (cd "$debs" && apt-get download -q "$pkg" >/dev/null 2>&1); then
        log "apt-get download failed; running apt-get update once"
        apt-get update -qq >/dev/null
        (cd "$debs" && apt-get download -q "$pkg" >/dev/null) ||
            die "cannot download $pkg"
    fi
}

kpkg=${GUEST_KERNEL_PKG:-}
if [ -z "$kpkg" ]; then
    # Prefer what is already cached, so no network is needed on re-runs.
    cached=$(cd "$debs" && ls linux-image-[0-9]*-amd64_*.deb 2>/dev/null |
             head -1 || true)
    if [ -n "$cached" ]; then
        kpkg=${cached%%_*}
    else
        kpkg=$(kernel_pkg)
        if [ -z "$kpkg" ]; then
            apt-get update -qq >/dev/null
            kpkg=$(kernel_pkg)
        fi
    fi
fi
[ -n "$kpkg" ] || die "cannot resolve the package linux-image-amd64 depends on"
case $kpkg in
    linux-image-6.1.*-amd64) ;;
    *) log "note: kernel package is $kpkg (expected linux-image-6.1.*-amd64)";;
esac
fetch "$kpkg"
fetch busybox-static

kdeb=$(ls "$debs/${kpkg}_"*.deb | head -1)
bdeb=$(ls "$debs/busybox-static_"*.deb | head -1)

# ---------------------------------------------------------------- stamp
stamp_now=$(sha256sum "$kdeb" "$bdeb" "$here/init" "$0" | sha256sum | cut -c1-16)
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp_now" ] &&
   [ -f "$out/vmlinuz" ] && [ -f "$out/initramfs.cpio" ]; then
    [ "${1:-}" = --print-dir ] && echo "$out"
    exit 0
fi

# ---------------------------------------------------------------- unpack
log "unpacking $(basename "$kdeb") and $(basename "$bdeb")"
tmp=$(mktemp -d "$out/tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
dpkg-deb -x "$kdeb" "$tmp/k"
dpkg-deb -x "$bdeb" "$tmp/b"

vmlinuz=$(ls "$tmp"/k/boot/vmlinuz-* | head -1)
kver=${vmlinuz##*/vmlinuz-}
moddir=$tmp/k/lib/modules/$kver
bb=$tmp/b/bin/busybox
[ -f "$vmlinuz" ] && [ -d "$moddir" ] && [ -x "$bb" ] || die "unexpected package layout"

# ------------------------------------------------------- module closure
# Index every .ko by module name (file name with - and _ equivalent).
find "$moddir" -name '*.ko' >"$tmp/ko.list"
modpath() {
    local n=${1//-/_}
    awk -v n="$n" '{ f = $0; sub(/.*\//, "", f); sub(/\.ko$/, "", f);
                     gsub(/-/, "_", f); if (f == n) { print $0; exit } }' \
        "$tmp/ko.list"
}
modfield() {
    # modfield KO FIELD: the value of FIELD= in the .ko's modinfo section
    grep -a -o "$2=[^[:cntrl:]]*" "$1" | head -1 | cut -d= -f2-
}
# "softdep=pre: crypto-crc32c" names a crypto algorithm; map the ones we
# can meet to the generic implementation (the guest CPU may lack SSE4.2).
softdep_module() {
    case $1 in
        crypto-crc32c|crc32c) echo crc32c_generic;;
        *) echo "";;
    esac
}

order=
visit() {
    local m=${1//-/_} ko dep pre
    case " $order " in *" $m "*) return 0;; esac
    case " ${visiting:-} " in *" $m "*) die "module dependency loop at $m";; esac
    visiting="${visiting:-} $m"
    ko=$(modpath "$m")
    [ -n "$ko" ] || die "module $m not found in $kpkg"
    for pre in $(modfield "$ko" softdep | sed 's/pre://; s/post:.*//'); do
        pre=$(softdep_module "$pre")
        [ -n "$pre" ] && visit "$pre"
    done
    for dep in $(modfield "$ko" depends | tr , ' '); do
        visit "$dep"
    done
    order="$order $m"
}
for m in $WANT_MODULES; do
    visit "$m"
done
log "modules:$order"

# ------------------------------------------------------------ initramfs
root=$tmp/root
mkdir -p "$root"/{bin,dev,proc,sys,mnt,tmp,lib/modules}
cp "$bb" "$root/bin/busybox"
for a in $("$bb" --list); do
    [ "$a" = busybox ] || ln -s busybox "$root/bin/$a"
done
: >"$root/lib/modules/order"
for m in $order; do
    cp "$(modpath "$m")" "$root/lib/modules/$m.ko"
    echo "$m" >>"$root/lib/modules/order"
done
install -m 0755 "$here/init" "$root/init"
if [ "$(id -u)" = 0 ]; then
    mknod "$root/dev/console" c 5 1
    mknod "$root/dev/null" c 1 3
fi
(cd "$root" && find . | LC_ALL=C sort | "$bb" cpio -o -H newc -R 0:0 \
    >"$tmp/initramfs.cpio" 2>/dev/null)

cp "$vmlinuz" "$tmp/vmlinuz"
cp "$bb" "$tmp/busybox.bin"
mv -f "$tmp/vmlinuz" "$out/vmlinuz"
mv -f "$tmp/initramfs.cpio" "$out/initramfs.cpio"
mv -f "$tmp/busybox.bin" "$out/busybox"
echo "$kver" >"$out/kernel-version"
echo "$stamp_now" >"$out/stamp"
log "built $out/vmlinuz ($kver) and $out/initramfs.cpio ($(du -k "$out/initramfs.cpio" | cut -f1) KiB)"
[ "${1:-}" = --print-dir ] && echo "$out"
exit 0
