#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Build QEMU's HTML manual with add-cow, the way QEMU builds it: Sphinx
# with warnings as errors (configure --enable-werror makes meson pass -W),
# in its own build directory so that the main build keeps --disable-docs.
# Only the "html" target is built: the manual needs no compiled code.
# Then check that the add-cow pages and QAPI types made it into the HTML.
#
# Environment: DOCS_BUILD_DIR (default .build/docs), QEMU_SRC.

set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
src=${QEMU_SRC:-$top/.build/qemu}
build=${DOCS_BUILD_DIR:-$top/.build/docs}

"$top/scripts/install-deps.sh" docs

# The source tree is shared with scripts/build.sh: hold its lock while
# the tree is prepared and read.
mkdir -p "$top/.build"
exec 9>"$top/.build/.build-lock"
flock 9

"$top/scripts/prepare-tree.sh"

if [ ! -f "$build/build.ninja" ]; then
    rm -rf "$build"
    mkdir -p "$build"
    (cd "$build" && "$src/configure" --python=/usr/bin/python3 \
        --target-list=x86_64-softmmu --enable-tools --enable-docs \
        --enable-werror --disable-rust --disable-install-blobs \
        >configure.log 2>&1) || {
        tail -30 "$build/configure.log" >&2
        echo "docs: configure failed; see $build/configure.log" >&2
        rm -f "$build/build.ninja"
        exit 1
    }
fi

log=$build/sphinx.log
if ! ninja -C "$build" html >"$log" 2>&1; then
    # Sphinx's messages, without ninja's and the command line
    sed -n '/^FAILED:/,$p' "$log" | grep -vE '^(FAILED:|/usr/bin/env|ninja:)' |
        head -30 >&2
    echo "docs: the manual did not build; see $log" >&2
    exit 1
fi
# -W stops at the first warning, so a finished build has none; say so
# from the log rather than assume it.
warnings=$(grep -ciE '(^|: )(warning|error)' "$log" || true)

man=$build/docs/manual
fail=0
# expect PAGE TEXT...: every TEXT occurs in the HTML page PAGE
expect() {
    local page=$man/$1 t
    shift
    if [ ! -f "$page" ]; then
        echo "docs: $page is missing" >&2
        fail=1
        return
    fi
    for t in "$@"; do
        if ! grep -qF -- "$t" "$page"; then
            echo "docs: ${page#"$top"/} lacks \"$t\"" >&2
            fail=1
        fi
    done
}

# The specification: title, a diagram and the header layout (literal
# blocks, as plain text), the field rules (bulleted, with inline literals),
# and sections from the start to the end
expect interop/add-cow.html \
    'Add-cow Image File Format' \
    '<div class="highlight-none notranslate"><div class="highlight"><pre>' \
    '| header | bitmap, 1 bit  |     | guest data at    |' \
    'Byte  0 -   3:  magic' \
    '112 - 127:  reserved1' \
    '<li><p><code class="docutils literal notranslate"><span class="pre">magic</span></code> is' \
    'Field rules' 'Write ordering' 'Crash model' 'Changes from the 2013 proposal'
expect interop/index.html 'href="add-cow.html"'
# The QAPI types and the add-cow enum members, in the QMP reference (QMP)
# and the storage daemon's (QSD)
for ref in QMP:qemu-qmp-ref QSD:qemu-storage-daemon-qmp-ref; do
    expect "interop/${ref#*:}.html" \
        "id=\"object-${ref%%:*}-block-core.BlockdevOptionsAddCow\"" \
        "id=\"object-${ref%%:*}-block-core.BlockdevCreateOptionsAddCow\"" \
        "id=\"object-${ref%%:*}-block-core.ImageInfoSpecificAddCow\"" \
        '<span class="pre">add-cow</span>'
done
expect system/qemu-block-drivers.html 'option-image-formats-arg-add-cow'
expect tools/qemu-img.html 'add-cow'

if [ "$fail" -ne 0 ]; then
    echo "docs: the add-cow documentation is incomplete in $man" >&2
    exit 1
fi
echo "docs: $warnings warnings; add-cow specification in" \
     "$man/interop/add-cow.html"
