#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Lay the add-cow overlay and patch series over the pinned QEMU tree.
#
# The unpacked tree is turned into a git repository whose first commit is
# pristine QEMU 10.2.2 (tag "pristine").  The patches in patches/ are applied
# once; when any of them changes, the touched files are reset to pristine and
# the series re-applied.  New files are copied only when their content
# changed, so an edit to block/add-cow.c rebuilds just that object.

set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
src=${QEMU_SRC:-$top/.build/qemu}

"$top/scripts/fetch-qemu.sh" "$src"

cd "$src"
if ! git rev-parse -q --verify refs/tags/pristine >/dev/null 2>&1; then
    git init -q
    git config user.name "add-cow build"
    git config user.email "add-cow@localhost"
    git config core.autocrlf false
    printf '/.add-cow-*\n' >> .git/info/exclude
    git add -A -f .
    git commit -q -m "QEMU 10.2.2 (Debian 1:10.2.2+ds-1)"
    git tag pristine
fi

# Patches to existing files.
stamp=.add-cow-patches
want=$(cat "$top"/patches/*.patch 2>/dev/null | sha256sum | cut -d' ' -f1)
have=$(cat "$stamp" 2>/dev/null || true)
if [ "$want" != "$have" ]; then
    changed=$(git diff --name-only pristine -- . ':!block/add-cow*' \
              ':!tests/qemu-iotests/tests/add-cow*' \
              ':!tests/qemu-iotests/tests/add_cow*' \
              ':!tests/qemu-iotests/*.out.add-cow' \
              ':!tests/image-fuzzer/add_cow*' \
              ':!docs/specs/add-cow.txt' ':!docs/interop/add-cow.rst' \
              ':!tests/unit/fuzz-add-cow*')
    # Keep a copy of every patched file: a file whose patched content comes
    # out the same gets its old mtime back, so that changing one patch does
    # not make ninja reconfigure or rebuild for the files of the others.
    keep=$(mktemp -d)
    trap 'rm -rf "$keep"' EXIT
    for f in $changed; do
        mkdir -p "$keep/$(dirname "$f")"
        cp -p "$f" "$keep/$f"
    done
    if [ -n "$changed" ]; then
        # shellcheck disable=SC2086
        git checkout -q pristine -- $changed
    fi
    for p in "$top"/patches/*.patch; do
        [ -e "$p" ] || continue
        if ! git apply --whitespace=nowarn "$p"; then
            echo "prepare-tree: $(basename "$p") does not apply to QEMU 10.2.2" >&2
            rm -f "$stamp"
            exit 1
        fi
    done
    for f in $changed; do
        if [ -f "$f" ] && cmp -s "$keep/$f" "$f"; then
            cp -p "$keep/$f" "$f"
        fi
    done
    echo "$want" > "$stamp"
fi

# New files: copy only what changed, keeping mtimes of the rest.
cd "$top"
git ls-files --cached --others --exclude-standard \
    'block/add-cow*' 'docs/specs/add-cow*' 'docs/interop/add-cow*' \
    'tests/qemu-iotests/tests/add-cow*' 'tests/qemu-iotests/tests/add_cow*' \
    'tests/qemu-iotests/*.out.add-cow' \
    'tests/image-fuzzer/add_cow*' 'tests/unit/fuzz-add-cow*' |
while read -r f; do
    [ -f "$f" ] || continue
    if ! cmp -s "$f" "$src/$f"; then
        mkdir -p "$(dirname "$src/$f")"
        cp -p "$f" "$src/$f"
    fi
done
