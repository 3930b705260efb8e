#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Build mutants of the add-cow driver, the negative controls of the crash
# checker and of the fault tests.  A mutant is a small patch,
# tests/qemu-iotests/tests/add-cow-mutants/NAME.patch, that breaks the
# driver's write ordering on purpose.  It is applied to a scratch copy of
# block/add-cow* (never to the tree that is built and shipped); the
# scratch sources are compiled with the build's own compile commands, and
# qemu-img and qemu-io are relinked from the build's objects with the
# mutant's in place of the driver's.  Only the driver compiles, so a
# mutant takes seconds, not a QEMU build.
#
# Usage: build-mutant.sh NAME... | --all
# Prints the directory holding the mutant's qemu-img and qemu-io, one line
# per mutant: $BUILD_DIR/add-cow-mutants/NAME/bin.  A mutant whose patch
# does not apply or does not compile is left without binaries, and the
# exit status is then non-zero; the other mutants are still built.
#
# Environment: BUILD_DIR (default .build/build, already built), QEMU_SRC.

set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
src=${QEMU_SRC:-$top/.build/qemu}
build=$(cd "${BUILD_DIR:-$top/.build/build}" && pwd)
patches=$top/tests/qemu-iotests/tests/add-cow-mutants
out=$build/add-cow-mutants

die() {
    echo "build-mutant: $*" >&2
    exit 1
}

# CMD with " FROM " replaced by " TO ", which must occur exactly once
subst() {
    local cmd=" $1 " from=" $2 " to=" $3 " rest
    rest=${cmd#*"$from"}
    if [ "$rest" = "$cmd" ] || [ "${rest#*"$from"}" != "$rest" ]; then
        die "'$2' is not in the command exactly once: $1"
    fi
    cmd=${cmd/"$from"/"$to"}
    cmd=${cmd# }
    echo "${cmd% }"
}

# The final command that ninja runs for TARGET
ninja_cmd() {
    local cmd
    cmd=$(ninja -C "$build" -t commands -s "$1")
    if [ -z "$cmd" ] || [ "$(echo "$cmd" | wc -l)" -ne 1 ]; then
        die "no single command for $1"
    fi
    echo "$cmd"
}

# One mutant, in a process of its own (the caller holds the lock)
if [ "${1:-}" = "--one" ]; then
    name=$2
    patch=$patches/$name.patch
    dir=$out/$name
    [ -f "$patch" ] || die "no mutant $name ($patch)"
    link_img=$(ninja_cmd qemu-img)
    link_io=$(ninja_cmd qemu-io)
    # The driver's objects, linked into both programs
    objs=$(echo "$link_img" | tr ' ' '\n' |
           grep -E '^libblock\.a\.p/block_add-cow[^/]*\.c\.o$') ||
        die "no add-cow object in the link command of qemu-img"

    # Nothing to do when the patch, the driver and the build are unchanged
    stamp=$( (cat "$patch" "$src"/block/add-cow*; echo "$link_img $link_io"
              cat "$build/qemu-img" "$build/qemu-io") | sha256sum)
    if [ -x "$dir/bin/qemu-img" ] && [ -x "$dir/bin/qemu-io" ] &&
       [ "$(cat "$dir/stamp" 2>/dev/null)" = "$stamp" ]; then
        echo "$dir/bin"
        exit 0
    fi
    rm -rf "$dir"
    mkdir -p "$dir/src/block" "$dir/obj"

    # The scratch copy: the driver, and the headers it may include by a
    # quoted name (found next to the including file first)
    cp "$src"/block/*.h "$src"/block/add-cow*.c "$dir/src/block/"
    patch -s -p1 -d "$dir/src" --batch --forward --fuzz=0 \
          --no-backup-if-mismatch <"$patch" >"$dir/patch.log" 2>&1 || {
        cat "$dir/patch.log" >&2
        die "$name.patch does not apply to block/add-cow*: update it"
    }
    if cmp -s <(cat "$src"/block/add-cow*) <(cat "$dir"/src/block/add-cow*)
    then
        die "$name.patch changes nothing in block/add-cow*"
    fi

    # Every driver object is compiled from the scratch copy, so that all
    # of them see the same (possibly patched) add-cow.h
    img=$link_img
    io=$link_io
    for obj in $objs; do
        cmd=$(ninja_cmd "$obj")
        file=${cmd##* -c }
        case "$file" in
        */block/add-cow*.c) ;;
        *) die "unexpected source '$file' in the command for $obj" ;;
        esac
        new=$dir/obj/$(basename "$obj")
        cmd=$(subst "$cmd" "-MD -MQ $obj -MF $obj.d" "")
        cmd=$(subst "$cmd" "-o $obj" "-o $new")
        cmd=$(subst "$cmd" "-c $file" "-c $dir/src/block/${file##*/}")
        (cd "$build" && sh -c "$cmd") >"$dir/build.log" 2>&1 || {
            cat "$dir/build.log" >&2
            die "mutant $name: ${file##*/} does not compile"
        }
        img=$(subst "$img" "$obj" "$new")
        io=$(subst "$io" "$obj" "$new")
    done
    mkdir "$dir/link"
    img=$(subst "$img" "-o qemu-img" "-o $dir/link/qemu-img")
    io=$(subst "$io" "-o qemu-io" "-o $dir/link/qemu-io")
    (cd "$build" && sh -c "$img" && sh -c "$io") >"$dir/link.log" 2>&1 || {
        cat "$dir/link.log" >&2
        die "mutant $name does not link"
    }
    # bin/ appears only complete
    mv "$dir/link" "$dir/bin"
    echo "$stamp" >"$dir/stamp"
    echo "$dir/bin"
    exit 0
fi

if [ "${1:-}" = "--all" ]; then
    set --
    for p in "$patches"/*.patch; do
        [ -e "$p" ] || die "no mutant in $patches"
        set -- "$@" "$(basename "$p" .patch)"
    done
fi
[ $# -gt 0 ] || die "usage: build-mutant.sh NAME... | --all"

# The build's objects and link commands are read: no rebuild meanwhile
mkdir -p "$top/.build"
exec 9>"$top/.build/.build-lock"
flock 9
for prog in qemu-img qemu-io; do
    [ -x "$build/$prog" ] || die "$build/$prog is missing: run make build"
done

status=0
for name in "$@"; do
    "$0" --one "$name" || status=1
done
exit $status
