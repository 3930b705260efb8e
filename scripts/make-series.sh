#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Export the whole change as a git format-patch series against pristine
# QEMU 10.2.2, one patch per logical step, and run checkpatch.pl on it.
#
# The series is made from what is committed in the project (HEAD), not
# from uncommitted edits.  The commits are made in a bare clone of the
# unpacked QEMU tree (out/series.git) through a private index, so neither
# the build tree nor a 400 MB checkout is involved.
# Output: out/series/*.patch.

set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
src=${QEMU_SRC:-$top/.build/qemu}
repo=$top/out/series.git
out=$top/out/series
author="add-cow developers <add-cow@localhost>"

"$top/scripts/prepare-tree.sh" >/dev/null

# git in the project's own repository
proj() {
    env -u GIT_DIR -u GIT_INDEX_FILE git -C "$top" "$@"
}
# The project's test files and patch files, as committed
committed=$(proj ls-tree -r --name-only HEAD)
test_files=$(echo "$committed" | grep -E \
    '^tests/(qemu-iotests/tests/add[-_]cow|image-fuzzer/add_cow/)' || true)
# add-cow reference outputs of QEMU's own tests
qed_test_outputs=$(echo "$committed" |
                   grep -E '^tests/qemu-iotests/[^/]*\.out\.add-cow$' || true)
patch_files=$(echo "$committed" | grep -E '^patches/[^/]*\.patch$' || true)

rm -rf "$repo" "$out" "$top/out/series-tree"
mkdir -p "$top/out"
git clone -q --bare --shared "$src" "$repo"
export GIT_DIR=$repo
export GIT_INDEX_FILE=$repo/series-index
export GIT_AUTHOR_NAME="add-cow developers" GIT_AUTHOR_EMAIL=add-cow@localhost
export GIT_COMMITTER_NAME="add-cow developers"
export GIT_COMMITTER_EMAIL=add-cow@localhost
git read-tree pristine
head=$(git rev-parse pristine)

# Every patch file must belong to a step (by its name)
steps='/[0-9]+-(docs|qapi|block|maintainers|iotests|image-fuzzer|tests)'
for p in $patch_files; do
    if ! echo "/$p" | grep -qE "$steps"; then
        echo "make-series: $(basename "$p") belongs to no step" >&2
        exit 1
    fi
done

# put FILE...: add committed project files to the index
put() {
    local f mode blob
    for f in "$@"; do
        mode=$(proj ls-tree HEAD -- "$f" | cut -d' ' -f1)
        if [ -z "$mode" ]; then
            echo "make-series: $f is not committed" >&2
            exit 1
        fi
        blob=$(proj cat-file blob "HEAD:$f" | git hash-object -w --stdin)
        git update-index --add --cacheinfo "$mode,$blob,$f"
    done
}
# apply REGEX [EXCLUDE]: apply the patch files whose name matches REGEX
# (and not EXCLUDE), in order
apply() {
    local p
    for p in $patch_files; do
        if echo "/$p" | grep -qE "$1" &&
           ! { [ -n "${2:-}" ] && echo "/$p" | grep -qE "$2"; }; then
            proj cat-file blob "HEAD:$p" | git apply --cached
        fi
    done
}
# commit: commit the index with the message on stdin, signed off
commit() {
    local msg tree
    msg=$(cat)
    tree=$(git write-tree)
    if [ "$tree" = "$(git rev-parse "$head^{tree}")" ]; then
        echo "make-series: step \"${msg%%$'\n'*}\" has no changes" >&2
        exit 1
    fi
    head=$(printf '%s\n\nSigned-off-by: %s\n' "$msg" "$author" |
           git commit-tree "$tree" -p "$head")
}

# 1. The specification and the documentation
put docs/specs/add-cow.txt docs/interop/add-cow.rst
apply '/[0-9]+-docs'
commit <<'MSG'
docs: add-cow image format specification

add-cow is a copy-on-write format that keeps guest data in a plain image
file (raw) at guest offsets, and a bitmap with one bit per cluster in a
separate .add-cow file: 1 means the cluster is in the image file, 0 means
read the backing file.  Once every cluster is filled the image file alone
is a standalone raw disk.

The specification fixes what review found wrong with the 2011-2013
proposals: an explicit virtual size, cluster sizes from 512 bytes, an
auto-clear "all allocated" bit, relative names resolved against the
.add-cow file's directory, refusal of json:/protocol image file names,
and a normative write-ordering rule with its crash model.

docs/specs/add-cow.txt is written as reStructuredText and rendered in the
interop manual through docs/interop/add-cow.rst.  The qemu-img manual
lists add-cow among the formats that support check and rebase and
describes its creation options; the block drivers reference gets an
add-cow section like qed's.
MSG

# 2. QAPI
apply '/[0-9]+-qapi'
commit <<'MSG'
qapi: add the add-cow block driver schema

BlockdevOptionsAddCow (image-file, cache-size), BlockdevCreateOptionsAddCow,
ImageInfoSpecificAddCow, the 'add-cow' BlockdevDriver member, and the
blkdebug events bitmap_load, bitmap_update and image_flush that let tests
target each step of a bitmap update.
MSG

# 3. The bitmap cache
put block/add-cow-cache.h block/add-cow-cache.c
commit <<'MSG'
block/add-cow: bitmap cache

A bounded LRU cache of fixed-size chunks of the add-cow bitmap with
per-entry dirty ranges.  Like qcow2-cache's depends_on_flush, a dirty
entry is only written after a flush, but the child flushed is the image
file holding the guest data, not the file the bitmap lives in: that is
what orders a bitmap bit after the data it describes.  One image flush
covers all bits set since the previous one.

It is the only code that reads or writes the bitmap's bytes: lookups of
runs, setting and clearing bits, an allocated-cluster count kept up to
date (so that query-named-block-nodes does no bitmap I/O), clearing on
shrink and when the image is emptied, and the raw scan qemu-img check
needs.  add-cow-cache.h needs nothing from the driver.  The cache is
only built together with the driver (the patch that adds add-cow.c).
MSG

# 4. Header and names
put block/add-cow.h block/add-cow-header.c
commit <<'MSG'
block/add-cow: header encoding, validation and names

add-cow.h holds the on-disk header layout, the driver state, and the
locking and write-ordering rules in one place.  add-cow-header.c
converts and validates the fixed header (every field, so that no value
read from an untrusted image can overflow an offset computation), reads
the image and backing file names, and is the one place that switches a
name: the new name goes into free bytes of the name area and is
flushed before the sector-0 write that points at it, so a crash leaves
either the old or the new header, never a torn name.
MSG

# 5. Check and repair
put block/add-cow-check.c
commit <<'MSG'
block/add-cow: check and repair

qemu-img check reports what a reader tolerates but a later operation
must not see: padding bits set past the last cluster (leaks, cleared by
-r leaks), the all-allocated flag over clear bits (set the bits, reads
follow the flag), and an image file that ends before allocated data
(extended by -r all).
MSG

# 6. Create, measure, amend
put block/add-cow-create.c
commit <<'MSG'
block/add-cow: create, measure and amend

blockdev-create and qemu-img create make the image file (the add-cow
file's name plus ".img" unless one is named; an existing file of the
derived name is refused, as it may hold another disk's data), write the
bitmap area and then the header.  measure counts both files.  amend
changes the backing format, switches to another image file that holds
the same data, or makes the image file a standalone raw disk
(image_file_raw=on) on an image without backing file.
MSG

# 7. The driver
put block/add-cow.c
apply '/[0-9]+-(block|maintainers)'
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
implements block status, make_empty, backing file changes, resize, zero
writes and discard, and migration hooks; create, check and amend come
from the previous patches.

The driver is always built, like qed; MAINTAINERS gets an add-cow
section for the driver, its specification and its tests.
MSG

# 8. iotests harness
apply '/[0-9]+-(iotests|image-fuzzer)' '/[0-9]+-iotests-add-cow-in-qed-tests'
commit <<'MSG'
iotests: accept the add-cow format

./check -add-cow, companion image file handling in common.rc and
iotests.py (a new image starts with a fresh image file, removing an image
removes its image file), a qemu-img map filter for the image file name,
and the exclusions of generic tests that need a capability add-cow
deliberately lacks (each with its reason).  The image fuzzer takes the
image format from its generator module.
MSG

# 9. The in-process fuzzer (run by the add-cow-fuzz-inproc iotest)
put tests/unit/fuzz-add-cow.c tests/unit/fuzz-add-cow.h
apply '/[0-9]+-tests'
commit <<'MSG'
tests/unit: add-cow in-process fuzzer

fuzz-add-cow makes valid add-cow seed images with bdrv_img_create(),
mutates their headers, names and bitmaps (the mutations of the iotests'
add_cow_fuzz.py) and opens each result in-process: an info-style open, a
read-only open with check, reads and block status, and a read-write open
with writes, resize and repair.  Without a qemu-img process per case a
sanitized build runs hundreds of cases per second.  A crash, assertion,
sanitizer or leak report, hang, node left open, or a failed read-write
open that changed the image ends the run with a replayable case number.

It is built like the block unit tests but is not a test() of the unit
suite: the add-cow-fuzz-inproc iotest runs a short fixed-seed replay.
With --enable-fuzzing, fuzz-add-cow-libfuzzer runs the same executions
under libFuzzer, guided by the coverage of the driver; --replay runs
such inputs once each in any build.
MSG

# 10. add-cow iotests
# shellcheck disable=SC2086
put $test_files
commit <<'MSG'
iotests: add-cow tests

Tests for creation, cluster sizes from 512 bytes to 2 MiB, partial
cluster copy-on-write, sizes of image and backing files, relative names,
malformed headers, QMP, the lifecycle operations, fault injection, a
crash-state checker with negative controls, a mutation fuzzer replay and
an independent reader written from the specification alone, plus the
add-cow image generator for tests/image-fuzzer.
MSG

# 11. QEMU's tests that run with qed run with add-cow too
# shellcheck disable=SC2086
put $qed_test_outputs
apply '/[0-9]+-iotests-add-cow-in-qed-tests'
commit <<'MSG'
iotests: run the tests that list qed with add-cow too

Every test whose format list names qed takes add-cow as well, except 116,
which is about the QED header.  add-cow keeps guest data in a separate
image file, so tests that copy or rename an image use _cp_test_img and
_mv_test_img, and 043 and 099 have add-cow reference outputs where the
output differs by design.
MSG

git update-ref refs/heads/add-cow "$head"
git format-patch -q --cover-letter -o "$out" pristine..add-cow
cover=$out/0000-cover-letter.patch
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
then the bitmap update; one image flush covers a batch of bitmap updates.

The series: the specification and documentation, the QAPI schema, the
bitmap cache, the driver, the iotests harness changes, an in-process
fuzzer, and the tests.
Based on QEMU 10.2.2.''')
open(p, 'w').write(s)
PY

errors=0
for p in "$out"/0*.patch; do
    [ "$p" = "$cover" ] && continue
    res=$(perl "$src/scripts/checkpatch.pl" --root="$src" "$p" 2>&1 || true)
    e=$(printf '%s\n' "$res" | sed -n 's/^total: \([0-9]*\) errors.*/\1/p')
    w=$(printf '%s\n' "$res" |
        sed -n 's/^total: [0-9]* errors, \([0-9]*\) warnings.*/\1/p')
    printf '%-60s %s errors, %s warnings\n' "$(basename "$p")" \
        "${e:-?}" "${w:-?}"
    if [ "${e:-1}" != 0 ]; then
        printf '%s\n' "$res" | grep -A4 '^ERROR' | head -40
        errors=$((errors + 1))
    fi
done
echo "make-series: $(find "$out" -name '*.patch' | wc -l) files in $out"
if [ "$errors" -ne 0 ]; then
    echo "make-series: checkpatch found errors in $errors patch(es)" >&2
    exit 1
fi
