#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
#
# The measurements behind add-cow's default cluster size and cache size
# (docs/add-cow-performance.md, "The default cluster size"): the
# copy-on-write rows of bench.py and random 4 KiB writes over a 1 TiB disk,
# for add-cow at several cluster sizes against qcow2 and qcow2
# extended_l2=on, in the same run, runs interleaved.
#
# Usage: scripts/bench-cluster-size.py ROWS FORMATS [RUNS]
#   ROWS: comma-separated of 4kcl-wb, 4kcl-none, f32-wb, f32-none, rand-wb,
#         rand-none, tib-wb, tib-wb-c32m, tib-f32-wb
#   FORMATS: comma-separated of qcow2, qcow2-l2ext, ac-4k, ac-8k, ac-16k,
#            ac-64k
# e.g. scripts/bench-cluster-size.py 4kcl-wb,rand-none qcow2-l2ext,ac-4k 3

import os
import random
import re
import statistics
import subprocess
import sys
import time

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B = os.environ.get('BUILD_DIR', os.path.join(TOP, '.build', 'build'))
D = os.path.join(TOP, '.build', 'bench-cluster-size')
IMG = os.path.join(B, 'qemu-img')
IO = os.path.join(B, 'qemu-io')
BASE = os.path.join(D, 'base.raw')
FMTS = {
    'qcow2-l2ext': ('qcow2', ['-o', 'extended_l2=on']),
    'qcow2': ('qcow2', []),
    'ac-4k': ('add-cow', ['-o', 'cluster_size=4k']),
    'ac-8k': ('add-cow', ['-o', 'cluster_size=8k']),
    'ac-16k': ('add-cow', ['-o', 'cluster_size=16k']),
    'ac-64k': ('add-cow', ['-o', 'cluster_size=64k']),
}


def run(args):
    t = time.time()
    r = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       universal_newlines=True)
    if r.returncode:
        sys.exit('failed: %s\n%s' % (' '.join(args[:8]), r.stdout[-500:]))
    return r.stdout, time.time() - t


def create(name, size='2G', backing=True):
    fmt, opts = FMTS[name]
    img = os.path.join(D, 'img.' + name)
    for f in os.listdir(D):
        if f.startswith('img.'):
            os.unlink(os.path.join(D, f))
    run([IMG, 'create', '-f', fmt] + opts +
        (['-b', BASE, '-F', 'raw'] if backing else []) + [img, size])
    subprocess.run(['sync'])
    return fmt, img


def bench(name, cache, aio, step, count, flush=0):
    """qemu-img bench: 4 KiB writes every @step bytes"""
    fmt, img = create(name)
    args = [IMG, 'bench', '-f', fmt, '-t', cache, '-i', aio, '-d', '32',
            '-s', '4096', '-S', str(step), '-c', str(count), '-w',
            '--pattern', '0xa5']
    if flush:
        args += ['--flush-interval', str(flush)]
    out, _ = run(args + [img])
    return float(re.search(r'Run completed in ([0-9.]+) seconds',
                           out).group(1))


def rnd(name, cache, aio, span, count, flush=0, cache_opt=None, size='2G'):
    """qemu-io: 4 KiB writes at @count distinct random offsets below @span"""
    fmt, img = create(name, size=size, backing=(size == '2G'))
    args = [IO, '-t', cache, '-i', aio]
    for i, off in enumerate(random.Random(1).sample(range(span // 4096),
                                                    count)):
        args += ['-c', 'aio_write -q -P 0x3c %d 4k' % (off * 4096)]
        if flush and (i + 1) % flush == 0:
            args += ['-c', 'aio_flush', '-c', 'flush']
        elif (i + 1) % 16384 == 0:
            args += ['-c', 'aio_flush']
    args += ['-c', 'aio_flush', '-c', 'flush']
    if cache_opt and fmt == 'add-cow':
        args += ['--image-opts', 'driver=%s,file.filename=%s,%s' %
                 (fmt, img, cache_opt)]
    else:
        args += ['-f', fmt, img]
    return run(args)[1]


ROWS = {
    '4kcl-wb': lambda n: bench(n, 'writeback', 'threads', 65536, 16384),
    '4kcl-none': lambda n: bench(n, 'none', 'native', 65536, 16384),
    'f32-wb': lambda n: bench(n, 'writeback', 'threads', 4096, 32768, 32),
    'f32-none': lambda n: bench(n, 'none', 'native', 4096, 32768, 32),
    'rand-wb': lambda n: rnd(n, 'writeback', 'threads', 2 << 30, 16384),
    'rand-none': lambda n: rnd(n, 'none', 'native', 2 << 30, 16384),
    'tib-wb': lambda n: rnd(n, 'writeback', 'threads', 1 << 40, 16384,
                            size='1T', cache_opt='cache-size=2M'),
    'tib-wb-c32m': lambda n: rnd(n, 'writeback', 'threads', 1 << 40, 16384,
                                 size='1T', cache_opt='cache-size=32M'),
    'tib-f32-wb': lambda n: rnd(n, 'writeback', 'threads', 1 << 40, 16384,
                                flush=32, size='1T'),
}


def main():
    rows = sys.argv[1].split(',')
    names = sys.argv[2].split(',')
    runs = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    os.makedirs(D, exist_ok=True)
    if not os.path.exists(BASE):
        run([IMG, 'create', '-f', 'raw', BASE, '2G'])
        run([IO, '-f', 'raw', '-c', 'write -P 0x5a 0 1G',
             '-c', 'write -P 0x5a 1G 1G', BASE])
    res = {}
    for r in range(runs):
        for row in rows:
            for n in (names if r % 2 == 0 else names[::-1]):
                res.setdefault((row, n), []).append(ROWS[row](n))
    for row in rows:
        ref = res.get((row, 'qcow2-l2ext'))
        ref = statistics.median(ref) if ref else None
        for n in names:
            v = res[(row, n)]
            m = statistics.median(v)
            print('%-12s %-12s median %.3f s (%.3f-%.3f)%s' %
                  (row, n, m, min(v), max(v),
                   '  %.2fx qcow2-l2ext' % (ref / m) if ref else ''))


if __name__ == '__main__':
    main()
