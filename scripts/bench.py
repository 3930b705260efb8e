#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
#
# add-cow benchmark: every format on the same file system and build, in one
# run, reported as ratios to raw-preallocated and to qcow2.
#
# Usage: scripts/bench.py [--runs N] [--scale S] [--out docs/add-cow-bench.md]
#
# Workloads use `qemu-img bench` (sequential / strided) and `qemu-io` with
# a list of aio requests (random patterns).  Several runs each; the median
# is reported with min-max.

import argparse
import datetime
import os
import platform
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.environ.get('BUILD_DIR', os.path.join(TOP, '.build', 'build'))
QEMU_IMG = os.path.join(BUILD, 'qemu-img')
QEMU_IO = os.path.join(BUILD, 'qemu-io')
MiB = 1024 * 1024
GiB = 1024 * MiB

# name -> (format, create options, uses backing file)
FORMATS = [
    ('raw-prealloc', 'raw', ['-o', 'preallocation=full'], False),
    ('raw-sparse', 'raw', [], False),
    ('qcow2', 'qcow2', [], True),
    ('qcow2-l2ext', 'qcow2', ['-o', 'extended_l2=on'],
     True),
    ('qcow2-datafile', 'qcow2', ['-o', 'data_file={img}.data'], True),
    ('qed', 'qed', [], True),
    ('add-cow-64k', 'add-cow', ['-o', 'cluster_size=64k'], True),
    ('add-cow-4k', 'add-cow', ['-o', 'cluster_size=4k'], True),
]


def run(args, **kw):
    r = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, **kw)
    if r.returncode:
        sys.exit('command failed: %s\n%s' % (' '.join(args), r.stdout))
    return r.stdout


class Bench:
    def __init__(self, workdir, size, runs):
        self.dir = workdir
        self.size = size
        self.runs = runs
        self.base = os.path.join(workdir, 'base.raw')
        self.results = {}       # (workload, fmt) -> [seconds]

    def path(self, name):
        return os.path.join(self.dir, name)

    def make_base(self):
        if os.path.exists(self.base) and \
           os.path.getsize(self.base) == self.size:
            return
        run([QEMU_IMG, 'create', '-q', '-f', 'raw', '-o',
             'preallocation=full', self.base, str(self.size)])
        run([QEMU_IMG, 'bench', '-q', '-w', '-f', 'raw', '--pattern', '0x5a',
             '-s', '1M', '-c', str(self.size // MiB), '-t', 'none',
             '-i', 'native', self.base])

    def create(self, name, fmt, opts, backing, img):
        for f in os.listdir(self.dir):
            if f.startswith('img.'):
                os.unlink(self.path(f))
        opts = [o.replace('{img}', img) for o in opts]
        args = [QEMU_IMG, 'create', '-q', '-f', fmt] + opts
        if backing:
            args += ['-b', self.base, '-F', 'raw']
        run(args + [img, str(self.size)])

    def timed(self, args):
        t0 = time.monotonic()
        out = run(args)
        t = time.monotonic() - t0
        m = re.search(r'Run completed in ([0-9.]+) seconds', out)
        return float(m.group(1)) if m else t

    def bench_args(self, fmt, cache, write, bs, step, count, flush=None):
        aio = 'native' if cache == 'none' else 'threads'
        a = [QEMU_IMG, 'bench', '-f', fmt, '-t', cache, '-i', aio,
             '-d', '32', '-s', str(bs), '-S', str(step), '-c', str(count)]
        if write:
            a += ['-w', '--pattern', '0xa5']
        if flush:
            a += ['--flush-interval', str(flush)]
        return a

    def random_io(self, fmt, cache, img, count, seed):
        rnd = random.Random(seed)
        span = self.size // 4096
        args = [QEMU_IO, '-f', fmt, '-t', cache]
        if cache == 'none':
            args += ['-i', 'native']
        for _ in range(count):
            args += ['-c', 'aio_write -q -P 0x3c %d 4k' %
                     (rnd.randrange(span) * 4096)]
        args += ['-c', 'aio_flush', img]
        return args

    def record(self, workload, name, secs):
        self.results.setdefault((workload, name), []).append(secs)

    def run_format(self, name, fmt, opts, backing, cache):
        img = self.path('img.' + name)
        n4k = self.size // 4096 // 4        # a quarter of the disk in 4k
        n64k = self.size // 65536 // 4
        sfx = ' (%s)' % ('none,native' if cache == 'none' else 'writeback')

        def fresh():
            self.create(name, fmt, opts, backing, img)

        def one(workload, args, prep=True):
            if prep:
                fresh()
            self.record(workload + sfx, name, self.timed(args + [img]))

        for _ in range(self.runs):
            one('alloc seq 4k', self.bench_args(fmt, cache, True, 4096,
                                                4096, n4k))
            # the same image, now allocated
            one('rewrite seq 4k', self.bench_args(fmt, cache, True, 4096,
                                                  4096, n4k), prep=False)
            one('read allocated 4k', self.bench_args(fmt, cache, False,
                                                     4096, 4096, n4k),
                prep=False)
            one('alloc 64k', self.bench_args(fmt, cache, True, 65536,
                                             65536, n64k))
            one('alloc 4k/cluster', self.bench_args(fmt, cache, True, 4096,
                                                    65536, n64k))
            one('alloc 4k flush/32', self.bench_args(fmt, cache, True, 4096,
                                                     65536, n64k, flush=32))
            one('read backing 64k', self.bench_args(fmt, cache, False,
                                                    65536, 65536, n64k))
            fresh()
            self.record('alloc random 4k' + sfx, name,
                        self.timed(self.random_io(fmt, cache, img, 4096,
                                                  len(self.results))))

    def run_convert(self, name, fmt, opts):
        out = self.path('img.' + name)
        for _ in range(self.runs):
            for f in os.listdir(self.dir):
                if f.startswith('img.'):
                    os.unlink(self.path(f))
            o = [x.replace('{img}', out) for x in opts]
            self.record('convert %d MiB' % (self.size // MiB), name,
                        self.timed([QEMU_IMG, 'convert', '-f', 'raw',
                                    '-O', fmt] + o + [self.base, out]))

    def peak_rss(self, name, fmt, opts):
        """Peak RSS of qemu-img bench reading across a 1 TiB disk"""
        img = self.path('img.rss.' + name)
        o = [x.replace('{img}', img) for x in opts
             if 'preallocation' not in x]
        run([QEMU_IMG, 'create', '-q', '-f', fmt] + o + [img, '1T'])
        # a child that only runs the bench, so its ru_maxrss is its own
        code = ('import resource,subprocess,sys;'
                'subprocess.run(sys.argv[1:],stdout=subprocess.DEVNULL);'
                'print(resource.getrusage(resource.RUSAGE_CHILDREN)'
                '.ru_maxrss)')
        out = run([sys.executable, '-c', code, QEMU_IMG, 'bench', '-f', fmt,
                   '-c', '16384', '-s', '4k', '-S', str(64 * MiB), img])
        for f in os.listdir(self.dir):
            if f.startswith('img.rss.'):
                os.unlink(self.path(f))
        return int(out.split()[-1])


def fmt_cell(vals, ref, ref2):
    med = statistics.median(vals)
    cell = '%.3f s (%.3f-%.3f)' % (med, min(vals), max(vals))
    r1 = '%.2fx' % (ref / med) if ref else '-'
    r2 = '%.2fx' % (ref2 / med) if ref2 else '-'
    return cell, r1, r2


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--runs', type=int, default=3)
    p.add_argument('--size', type=int, default=1024, help='MiB')
    p.add_argument('--dir', default=os.path.join(TOP, '.build', 'bench'))
    p.add_argument('--out', default=os.path.join(TOP, 'docs',
                                                 'add-cow-bench.md'))
    p.add_argument('--png', default=os.path.join(TOP, 'docs',
                                                 'add-cow-bench.png'))
    p.add_argument('--formats', default='')
    p.add_argument('--caches', default='writeback,none')
    a = p.parse_args()

    if os.path.exists(a.dir):
        shutil.rmtree(a.dir)
    os.makedirs(a.dir)
    st = os.statvfs(a.dir)
    if st.f_bfree * st.f_bsize < 4 * a.size * MiB:
        sys.exit('not enough space in %s' % a.dir)
    out = subprocess.run(['stat', '-f', '-c', '%T', a.dir],
                         capture_output=True, text=True).stdout.strip()
    if out == 'tmpfs':
        sys.exit('refusing to benchmark on tmpfs (SEEK_DATA is slow there)')

    b = Bench(a.dir, a.size * MiB, a.runs)
    b.make_base()
    formats = [f for f in FORMATS
               if not a.formats or f[0] in a.formats.split(',')]
    for cache in a.caches.split(','):
        for name, fmt, opts, backing in formats:
            print('bench: %s, cache=%s' % (name, cache), flush=True)
            b.run_format(name, fmt, opts, backing, cache)
    rss = {}
    for name, fmt, opts, backing in formats:
        if name in ('raw-prealloc',):
            continue
        b.run_convert(name, fmt, opts)
        rss[name] = b.peak_rss(name, fmt, opts)

    workloads = []
    for (w, _) in b.results:
        if w not in workloads:
            workloads.append(w)

    lines = ['# add-cow benchmark', '',
             'Written by `make bench` (scripts/bench.py) on %s, host %s, '
             '%d CPUs, kernel %s, file system of %s; QEMU build %s.' %
             (datetime.date.today().isoformat(), platform.node(),
              os.cpu_count(), platform.release(), a.dir, BUILD),
             '', 'Each cell: median seconds of %d runs (min-max), then the '
             'speed ratio to raw-preallocated and to qcow2 from the same run '
             '(higher is faster). Disk size %d MiB; workloads touch a '
             'quarter of it; writes through a raw backing file full of '
             'non-zero data.' % (a.runs, a.size), '']
    chart = {}
    for w in workloads:
        lines += ['## ' + w, '', '| format | time | vs raw-prealloc | '
                  'vs qcow2 |', '|---|---|---|---|']
        ref = b.results.get((w, 'raw-prealloc'))
        ref = statistics.median(ref) if ref else None
        if w.startswith('convert'):
            ref = b.results.get((w, 'raw-sparse'))
            ref = statistics.median(ref) if ref else None
        ref2 = b.results.get((w, 'qcow2'))
        ref2 = statistics.median(ref2) if ref2 else None
        for name, _, _, _ in formats:
            vals = b.results.get((w, name))
            if not vals:
                continue
            cell, r1, r2 = fmt_cell(vals, ref, ref2)
            lines.append('| %s | %s | %s | %s |' % (name, cell, r1, r2))
            chart.setdefault(w, {})[name] = (ref2 / statistics.median(vals)
                                             if ref2 else None)
        lines.append('')
    lines += ['For convert, the first ratio is to raw (sparse): the same '
              'conversion into a raw file.', '']
    lines += ['## Peak RSS, 1 TiB virtual disk', '',
              '| format | peak RSS (KiB) | vs qcow2 |', '|---|---|---|']
    for name, kib in rss.items():
        lines.append('| %s | %d | %.2fx |' % (name, kib,
                                              kib / rss.get('qcow2', kib)))
    lines.append('')
    with open(a.out, 'w') as f:
        f.write('\n'.join(lines))
    print('\n'.join(lines))

    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print('bench: matplotlib missing, no chart')
        return
    names = [n for n, _, _, _ in formats]
    ws = [w for w in workloads if w in chart]
    fig, ax = plt.subplots(figsize=(14, 6))
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        ys = [chart[w].get(n) or 0 for w in ws]
        ax.bar([x + i * width for x in range(len(ws))], ys, width, label=n)
    ax.axhline(1.0, color='black', linewidth=0.8)
    ax.set_xticks([x + 0.4 for x in range(len(ws))])
    ax.set_xticklabels(ws, rotation=30, ha='right', fontsize=8)
    ax.set_ylabel('speed relative to qcow2 (same run)')
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.png, dpi=90)
    print('bench: chart in %s' % a.png)


if __name__ == '__main__':
    main()
