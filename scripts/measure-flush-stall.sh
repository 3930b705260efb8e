#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Does a read that does not depend on a guest flush wait for the image
# file's fsync?  The image file is a null-co node with 300 ms latency on
# every request (flushes included); the backing file is a raw file on
# disk.  An allocating FUA write takes 300 ms for its data and 300 ms for
# the image flush that must precede its bitmap write.  A read from the
# backing file is issued DELAY ms after the write (default: 100, during
# the data write, and 450, during the image flush) and its latency is
# printed.  With the image flush made under the driver's lock, the read
# issued during the flush waits for it (about 150 ms and more).
#
# Usage: measure-flush-stall.sh [QEMU_IO_DIR]   (default .build/build;
# a mutant's bin directory from build-mutant.sh works too)

set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
bin=$(cd "${1:-$top/.build/build}" && pwd)
qemu_img=$top/.build/build/qemu-img
qemu_io=$bin/qemu-io
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cd "$dir"

"$qemu_img" create -q -f raw base.raw 2M
"$qemu_io" -f raw -c 'write -q -P 0x5a 0 2M' base.raw
"$qemu_img" create -q -f add-cow -b base.raw -F raw x.add-cow 2M

img='{"driver":"null-co","size":2097152,"latency-ns":300000000}'
json='json:{"driver":"add-cow","file":{"driver":"file",'
json+='"filename":"x.add-cow"},"image-file":'$img'}'

# qemu-io prints each request's rate; its latency is 1 / (ops/sec)
latency() {
    awk '/^read 65536\/65536 bytes at offset 1048576/ { r = 1; next }
         r && /ops\/sec/ { gsub(/[()]/, "");
                           for (i = 1; i < NF; i++)
                               if ($i == "and") v = $(i + 1);
                           printf "%.2f ms\n", 1000 / v; done = 1; exit }
         END { if (!done) print "no figure (the read did not complete)" }'
}

# Each write allocates clusters of its own (an allocated cluster needs no
# image flush before a bitmap write)
off=0
for delay in 100 450; do
    for _ in 1 2 3; do
        printf 'FUA allocating write at %dk, backing read issued at %d ms: ' \
            "$off" "$delay"
        "$qemu_io" -c "aio_write -q -f ${off}k 64k" -c "sleep $delay" \
            -c 'aio_read 1M 64k' -c aio_flush "$json" 2>&1 | latency
        off=$((off + 64))
    done
done
