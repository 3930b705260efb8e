#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Export the whole change as a git format-patch series against pristine
# QEMU 10.2.2, one patch per logical step, and run checkpatch.pl on it.
# The series is built in a separate clone (out/series-tree); the build
# tree is not touched.  Output: out/series/*.patch.

set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
src=${QEMU_SRC:-$top/.build/qemu}
tree=$top/out/series-tree
out=$top/out/series

"$top/scripts/prepare-tree.sh" >/dev/null

rm -rf "$tree" "$out"
mkdir -p "$top/out"
git clone -q --no-checkout "$src" "$tree"
cd "$tree"
git checkout -q -b add-cow pristine
git config user.name "add-cow developers"
git config user.email "add-cow@localhost"

# Files of the project that go into each step
put() {
    local f
    for f in "$@"; do
        mkdir -p "$(dirname "$f")"
        cp -p "$top/$f" "$f"
        git add "$f"
    done
}
apply() {
    local p
    for p in "$@"; do
        git apply --index "$p"
    done
}
patches_matching() {
    # Patch files whose name matches $1 (extended regex), in order
    ls "$top"/patches/*.patch | grep -E "$1" || true
}
commit() {
    git commit -q -s -F -
}

# Every patch file must belong to a step (by its name)
steps='/[0-9]+-(docs|qapi|block|maintainers|iotests|image-fuzzer)'
for p in "$top"/patches/*.patch; do
    if ! echo "$p" | grep -qE "$steps"; then
        echo "make-series: $(basename "$p") belongs to no step" >&2
        exit 1
    fi
done
take() {
    patches_matching "$1"
}

# 1. The specification (and its docs hunks)
put docs/specs/add-cow.txt
[ -f "$top/docs/interop/add-cow.rst" ] && put docs/interop/add-cow.rst
# shellcheck disable=SC2046
apply $(take '/[0-9]+-docs')
commit <<'MSG'
docs: add-cow image format specification

add-cow is a copy-on-write format that keeps guest data in a plain image
file (normally raw) at guest offsets, and a bitmap with one bit per
cluster in a separate .add-cow file: 1 means the cluster is in the image
file, 0 means read the backing file.  Once every cluster is filled the
image file alone is a standalone raw disk.

The specification fixes what review found wrong with the 2011-2013
proposals: an explicit virtual size, cluster sizes from 512 bytes, an
auto-clear "all allocated" bit, relative names resolved against the
.add-cow file's directory, refusal of json:/protocol image file names,
and a normative write-ordering rule with its crash model.
MSG

# 2. QAPI
# shellcheck disable=SC2046
apply $(take '/[0-9]+-qapi')
commit <<'MSG'
qapi: add the add-cow block driver schema

BlockdevOptionsAddCow (image-file, cache-size), BlockdevCreateOptionsAddCow,
ImageInfoSpecificAddCow, the 'add-cow' BlockdevDriver member, and the
blkdebug events bitmap_load, bitmap_update and image_flush that let tests
target each step of a bitmap update.
MSG

# 3. The bitmap cache
put block/add-cow.h block/add-cow-cache.c
commit <<'MSG'
block/add-cow: bitmap cache

A bounded LRU cache of fixed-size chunks of the add-cow bitmap with
per-entry dirty ranges.  Like qcow2-cache's depends_on_flush, a dirty
entry is only written after a flush, but the child flushed is the image
file holding the guest data, not the file the bitmap lives in: that is
what orders a bitmap bit after the data it describes.  One image flush
covers all bits set since the previous one.

The cache is only built together with the driver (next patch).
MSG

# 4. The driver
put block/add-cow.c
# shellcheck disable=SC2046
apply $(take '/[0-9]+-(block|maintainers)')
commit <<'MSG'
block: add the add-cow image format driver

Reads are split into runs of allocated and unallocated clusters, one
vectored request per run, to the image file or the backing file.  Writes
to allocated clusters go straight to the image file.  An allocating
write registers its cluster-aligned range in a request list (overlapping
allocations wait, different clusters proceed in parallel), writes head
fill, guest data and tail fill in one request, and only then sets the
bits in the cache, which flushes the image file before it writes them.

The image file named in the header is opened as a plain file name
relative to the .add-cow file (never parsed as json: or a protocol
string), or given as a node with the image-file option.  The driver
implements create (qemu-img and blockdev-create), block status, check
and repair, make_empty, backing file changes with an untearable header
update, resize, zero writes and discard, and migration hooks.
MSG

# 5. iotests harness
# shellcheck disable=SC2046
apply $(take '/[0-9]+-(iotests|image-fuzzer)')
commit <<'MSG'
iotests: accept the add-cow format

./check -add-cow, companion image file handling in common.rc and
iotests.py, filters for add-cow's create options and image file name, and
the exclusions of generic tests that need a capability add-cow
deliberately lacks (each with its reason).
MSG

# 6. add-cow iotests
# shellcheck disable=SC2046
put $(cd "$top" && git ls-files 'tests/qemu-iotests/tests/add-cow*' \
      'tests/qemu-iotests/tests/add_cow*' 'tests/image-fuzzer/add_cow*')
commit <<'MSG'
iotests: add-cow tests

Tests for creation, cluster sizes from 512 bytes to 2 MiB, partial
cluster copy-on-write, sizes of image and backing files, relative names,
malformed headers, QMP, the lifecycle operations, fault injection, a
crash-state checker with negative controls, a mutation fuzzer replay and
an independent reader written from the specification alone.
MSG


git format-patch -q --cover-letter -o "$out" pristine..add-cow
cover=$(ls "$out"/0000-cover-letter.patch)
python3 - "$cover" <<'PY'
import sys
p = sys.argv[1]
s = open(p).read()
s = s.replace('*** SUBJECT HERE ***', 'Add the add-cow image format')
s = s.replace('*** BLURB HERE ***', '''add-cow keeps guest data in a plain raw image file at guest offsets and
a one-bit-per-cluster bitmap in a small .add-cow file, so that a raw file
can be the target of copy-on-write, streaming and mirroring, and becomes a
standalone disk once every cluster has been copied.  The write path is
crash-safe: data and copy-on-write fill, then a flush of the image file,
then the bitmap update; one image flush covers a batch of bitmap updates.''')
open(p, 'w').write(s)
PY

errors=0
for p in "$out"/0*.patch; do
    [ "$(basename "$p")" = 0000-cover-letter.patch ] && continue
    res=$(perl "$src/scripts/checkpatch.pl" --root="$src" "$p" 2>&1 || true)
    e=$(printf '%s\n' "$res" | sed -n 's/^total: \([0-9]*\) errors.*/\1/p')
    w=$(printf '%s\n' "$res" | sed -n 's/^total: [0-9]* errors, \([0-9]*\) warnings.*/\1/p')
    printf '%-60s %s errors, %s warnings\n' "$(basename "$p")" "${e:-?}" "${w:-?}"
    if [ "${e:-1}" != 0 ]; then
        printf '%s\n' "$res" | grep -A4 '^ERROR' | head -40
        errors=$((errors + 1))
    fi
done
echo "make-series: $(ls "$out" | wc -l) files in $out"
[ "$errors" -eq 0 ]
