#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
#
# add-cow benchmark: every format on the same file system and build, in one
# run, reported as ratios to raw-preallocated and to qcow2.
#
# Usage: scripts/bench.py [--runs N] [--size MiB] [--touch MiB]
#                         [--out docs/add-cow-bench.md] [--png ...]
#
# Workloads use `qemu-img bench` (sequential / strided, queue depth 32) and
# `qemu-io` with a list of aio requests (random pattern).  Runs are
# interleaved (run 1 of every format, then run 2, ...) so that a change in
# the machine's load hits all formats alike; the median is reported with
# min-max, and every ratio compares medians from the same invocation.

import argparse
import datetime
import os
import platform
import random
import re
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
    ('qcow2-l2ext', 'qcow2', ['-o', 'extended_l2=on'], True),
    ('qcow2-datafile', 'qcow2', ['-o', 'data_file={img}.data'], True),
    ('qed', 'qed', [], True),
    ('add-cow-64k', 'add-cow', ['-o', 'cluster_size=64k'], True),
    ('add-cow-4k', 'add-cow', ['-o', 'cluster_size=4k'], True),
]

# cache mode label -> (qemu -t, qemu -i, formats measured; None = all)
CACHES = {
    'writeback': ('writeback', 'threads', None),
    'none-native': ('none', 'native', None),
    'none-io_uring': ('none', 'io_uring',
                      ['raw-prealloc', 'qcow2', 'add-cow-64k']),
}

# Peak RSS is measured for these (qcow2-like formats take long to allocate
# metadata all over a 1 TiB disk and add nothing to the comparison)
RSS_FORMATS = ['raw-sparse', 'qcow2', 'add-cow-64k', 'add-cow-4k']

# Workloads that define the targets (issue 7), add-cow-64k against:
#   workload prefix -> (reference, minimum ratio)
TARGETS = [
    ('rewrite seq 4k', 'raw-prealloc', 0.97),
    ('read allocated 4k', 'raw-prealloc', 0.97),
    ('read backing 64k', 'qcow2', 1.0),
    ('alloc seq 4k', 'qcow2', 1.2),
    ('alloc 64k', 'qcow2', 1.2),
    ('alloc 4k/cluster', 'qcow2', 1.2),
    ('alloc random 4k', 'qcow2', 1.2),
    ('alloc 4k flush/32', 'qcow2', 1.0),
]


class Failed(Exception):
    pass


def run(args, **kw):
    r = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       universal_newlines=True, **kw)
    if r.returncode:
        raise Failed('command failed (status %d): %s\n%s' %
                     (r.returncode, ' '.join(args), r.stdout))
    return r.stdout


def loadavg():
    with open('/proc/loadavg') as f:
        return ' '.join(f.read().split()[:3])


def machine():
    model = '?'
    with open('/proc/cpuinfo') as f:
        for line in f:
            if line.startswith('model name'):
                model = line.split(':', 1)[1].strip()
                break
    with open('/proc/meminfo') as f:
        mem = int(f.readline().split()[1]) // 1024
    try:
        rev = subprocess.run(['git', '-C', TOP, 'rev-parse', '--short',
                              'HEAD'], stdout=subprocess.PIPE,
                             universal_newlines=True).stdout.strip()
    except OSError:
        rev = '?'
    return ('host %s, %s, %d CPUs, %d MiB RAM, kernel %s; project commit %s'
            % (platform.node(), model, os.cpu_count(), mem,
               platform.release(), rev or '?'))


class Bench:
    def __init__(self, workdir, size, touch, runs):
        self.dir = workdir
        self.size = size
        self.touch = touch
        self.runs = runs
        self.base = os.path.join(workdir, 'base.raw')
        self.results = {}       # (workload, fmt) -> [seconds]

    def path(self, name):
        return os.path.join(self.dir, name)

    def make_base(self):
        run([QEMU_IMG, 'create', '-q', '-f', 'raw', '-o',
             'preallocation=full', self.base, str(self.size)])
        run([QEMU_IMG, 'bench', '-q', '-w', '-f', 'raw', '--pattern', '0x5a',
             '-s', '1M', '-c', str(self.size // MiB), '-t', 'none',
             '-i', 'native', self.base])

    def clean(self, prefix='img.'):
        for f in os.listdir(self.dir):
            if f.startswith(prefix):
                os.unlink(self.path(f))

    def create(self, fmt, opts, backing, img, size=None):
        self.clean()
        opts = [o.replace('{img}', img) for o in opts]
        args = [QEMU_IMG, 'create', '-q', '-f', fmt] + opts
        if backing:
            args += ['-b', self.base, '-F', 'raw']
        run(args + [img, str(size or self.size)])

    def timed(self, args):
        # Dirty pages of the previous step must not be written meanwhile
        os.sync()
        t0 = time.monotonic()
        out = run(args)
        t = time.monotonic() - t0
        m = re.search(r'Run completed in ([0-9.]+) seconds', out)
        return float(m.group(1)) if m else t

    def bench_args(self, fmt, cache, aio, write, bs, step, count,
                   flush=None):
        a = [QEMU_IMG, 'bench', '-f', fmt, '-t', cache, '-i', aio,
             '-d', '32', '-s', str(bs), '-S', str(step), '-c', str(count)]
        if write:
            a += ['-w', '--pattern', '0xa5']
        if flush:
            a += ['--flush-interval', str(flush)]
        return a

    def random_io(self, fmt, cache, aio, img, count, seed):
        rnd = random.Random(seed)
        span = self.size // 4096
        args = [QEMU_IO, '-f', fmt, '-t', cache, '-i', aio]
        for off in rnd.sample(range(span), count):
            args += ['-c', 'aio_write -q -P 0x3c %d 4k' % (off * 4096)]
        args += ['-c', 'aio_flush', img]
        return args

    def record(self, workload, name, secs):
        self.results.setdefault((workload, name), []).append(secs)

    def run_format(self, name, fmt, opts, backing, label, seed):
        cache, aio, _ = CACHES[label]
        img = self.path('img.' + name)
        n4k = self.touch // 4096
        n64k = self.touch // 65536
        sfx = ' (%s)' % label

        def fresh():
            self.create(fmt, opts, backing, img)

        def one(workload, args, prep=True):
            if prep:
                fresh()
            self.record(workload + sfx, name, self.timed(args + [img]))

        def ba(*a, **kw):
            return self.bench_args(fmt, cache, aio, *a, **kw)

        one('alloc seq 4k', ba(True, 4096, 4096, n4k))
        # the same image, now allocated
        one('rewrite seq 4k', ba(True, 4096, 4096, n4k), prep=False)
        one('read allocated 4k', ba(False, 4096, 4096, n4k), prep=False)
        one('alloc 64k', ba(True, 65536, 65536, n64k))
        one('alloc 4k/cluster', ba(True, 4096, 65536, n64k))
        one('alloc 4k flush/32', ba(True, 4096, 65536, n64k, flush=32))
        one('read backing 64k', ba(False, 65536, 65536, n64k))
        fresh()
        self.record('alloc random 4k' + sfx, name,
                    self.timed(self.random_io(fmt, cache, aio, img,
                                              n64k, seed)))

    def run_convert(self, name, fmt, opts):
        out = self.path('img.' + name)
        self.clean()
        o = [x.replace('{img}', out) for x in opts]
        # The O_DIRECT workloads leave the base out of the page cache: read
        # it once, or the first format converted pays for a cold read
        with open(self.base, 'rb') as f:
            while f.read(8 * MiB):
                pass
        self.record('convert %d MiB' % (self.size // MiB), name,
                    self.timed([QEMU_IMG, 'convert', '-f', 'raw',
                                '-O', fmt] + o + [self.base, out]))
        self.clean()

    def peak_rss(self, name, fmt, opts):
        """Peak RSS (KiB) of qemu-img bench across a 1 TiB disk

        One 4 KiB write every 512 MiB allocates metadata all over the disk
        (every L2 table of qcow2, every bitmap cache entry of add-cow),
        then the same pattern is read back; the larger peak counts."""
        img = self.path('img.rss.' + name)
        o = [x.replace('{img}', img) for x in opts
             if 'preallocation' not in x]
        run([QEMU_IMG, 'create', '-q', '-f', fmt] + o + [img, '1T'])
        # a child that only runs the bench, so its ru_maxrss is its own
        code = ('import resource,subprocess,sys;'
                'subprocess.run(sys.argv[1:],stdout=subprocess.DEVNULL);'
                'print(resource.getrusage(resource.RUSAGE_CHILDREN)'
                '.ru_maxrss)')
        peak = 0
        for w in (['-w'], []):
            out = run([sys.executable, '-c', code, QEMU_IMG, 'bench', '-f',
                       fmt, '-c', '2048', '-s', '4k', '-S', str(512 * MiB)] +
                      w + [img])
            peak = max(peak, int(out.split()[-1]))
        self.clean('img.rss.')
        return peak


def fmt_cell(vals, ref, ref2):
    med = statistics.median(vals)
    cell = '%.3f (%.3f-%.3f)' % (med, min(vals), max(vals))
    r1 = '%.2fx' % (ref / med) if ref else '-'
    r2 = '%.2fx' % (ref2 / med) if ref2 else '-'
    return cell, r1, r2


def chart(path, formats, workloads, ratios):
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print('bench: matplotlib missing (apt-get install '
              'python3-matplotlib), no chart')
        return
    ws = [w for w in workloads if w in ratios]
    fig, axes = plt.subplots(2, 1, figsize=(16, 10))
    for ax, key, title in ((axes[0], 'qcow2', 'speed relative to qcow2'),
                           (axes[1], 'raw-prealloc',
                            'speed relative to raw-prealloc (convert: '
                            'raw)')):
        width = 0.8 / len(formats)
        for i, n in enumerate(formats):
            ys = [min(ratios[w].get((n, key)) or 0, 4) for w in ws]
            ax.bar([x + i * width for x in range(len(ws))], ys, width,
                   label=n)
        ax.axhline(1.0, color='black', linewidth=0.8)
        ax.set_xticks([x + 0.4 for x in range(len(ws))])
        ax.set_xticklabels(ws, rotation=35, ha='right', fontsize=7)
        ax.set_ylabel(title + ' (higher is faster, cut at 4)', fontsize=8)
        ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    print('bench: chart in %s' % path)


def report(a, b, formats, rss, runs, started, load0, fstype):
    load1 = loadavg()
    ended = datetime.datetime.now(datetime.timezone.utc)

    workloads = []
    for (w, _) in b.results:
        if w not in workloads:
            workloads.append(w)

    lines = [
        '# add-cow benchmark', '',
        '<!-- Written by scripts/bench.py (make bench); do not edit. '
        'Notes on the optimisations: add-cow-performance.md -->', '',
        '- Date: %s to %s UTC' % (started.strftime('%Y-%m-%d %H:%M'),
                                   ended.strftime('%H:%M')),
        '- Machine: %s' % machine(),
        '- File system: %s (%s); QEMU build %s' % (a.dir, fstype, BUILD),
        '- Load average (1/5/15 min) at start %s, at end %s' % (load0,
                                                                 load1),
        '- Command: `%s`' % ' '.join(['scripts/bench.py'] + sys.argv[1:]),
        '',
        'Each cell: median seconds of %d runs (min-max; the formats run in '
        'a rotated order, a different one first in each run), then the speed '
        'ratio (reference time / time: higher is faster) to raw-preallocated '
        'and to qcow2 of the same cache mode, from this invocation. Virtual '
        'disk %d MiB; each workload covers %d MiB with queue depth 32 '
        '(qemu-img bench); writes go through a raw backing file full of '
        'non-zero data. Timings are qemu-img bench\'s own (open and close '
        'excluded); the random workload times a whole qemu-io process '
        '(%d aio_write requests at distinct random 4 KiB offsets over the '
        'whole disk, then aio_flush), so its ratios include open and close.'
        % (runs, a.size, b.touch // MiB, b.touch // 65536), '']

    ratios = {}
    summary = []
    for w in workloads:
        conv = w.startswith('convert')
        lines += ['## ' + w, '', '| format | seconds | vs %s | vs qcow2 |' %
                  ('raw' if conv else 'raw-prealloc'), '|---|---|---|---|']
        ref = b.results.get((w, 'raw-sparse' if conv else 'raw-prealloc'))
        ref = statistics.median(ref) if ref else None
        ref2 = b.results.get((w, 'qcow2'))
        ref2 = statistics.median(ref2) if ref2 else None
        for name, _, _, _ in formats:
            vals = b.results.get((w, name))
            if not vals:
                continue
            cell, r1, r2 = fmt_cell(vals, ref, ref2)
            lines.append('| %s | %s | %s | %s |' % (name, cell, r1, r2))
            med = statistics.median(vals)
            rr = ratios.setdefault(w, {})
            rr[(name, 'raw-prealloc')] = ref / med if ref else None
            rr[(name, 'qcow2')] = ref2 / med if ref2 else None
        lines.append('')
        for prefix, key, want in TARGETS + [('convert', 'raw-prealloc',
                                             0.95)]:
            if w.startswith(prefix):
                got = ratios[w].get(('add-cow-64k', key))
                if got is not None:
                    summary.append('| %s | %s | %.2fx | >= %.2fx | %s |' % (
                        w, 'raw' if conv else key, got, want,
                        'met' if got >= want else 'MISSED'))

    lines += ['For convert, the first ratio is to raw (sparse): the same '
              'conversion into a raw file.', '']
    lines += ['## Peak RSS, 1 TiB virtual disk', '',
              'qemu-img bench writes 4 KiB every 512 MiB (2048 requests, '
              'no backing file), then reads the same pattern; the larger '
              'peak RSS of the two processes.', '',
              '| format | peak RSS (KiB) | vs qcow2 |', '|---|---|---|']
    for name, kib in rss.items():
        lines.append('| %s | %d | %.2fx |' % (name, kib,
                                              kib / rss.get('qcow2', kib)))
    lines.append('')
    if 'add-cow-64k' in rss and 'qcow2' in rss:
        summary.append('| peak RSS, 1 TiB | qcow2 | %.2fx | <= 1.00x | %s |'
                       % (rss['add-cow-64k'] / rss['qcow2'],
                          'met' if rss['add-cow-64k'] <= rss['qcow2']
                          else 'MISSED'))
    if summary:
        head = ['## Targets (add-cow-64k, medians of this run)', '',
                '| workload | reference | ratio | target | |',
                '|---|---|---|---|---|'] + summary + ['']
        i = lines.index('## ' + workloads[0]) if workloads else len(lines)
        lines[i:i] = head
    with open(a.out, 'w') as f:
        f.write('\n'.join(lines))
    print('\n'.join(lines))
    chart(a.png, [n for n, _, _, _ in formats], workloads, ratios)


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--runs', type=int, default=3)
    p.add_argument('--size', type=int, default=1024,
                   help='virtual disk size and convert size, MiB')
    p.add_argument('--touch', type=int, default=128,
                   help='MiB each workload covers')
    p.add_argument('--dir', default=os.path.join(TOP, '.build', 'bench'))
    p.add_argument('--out', default=os.path.join(TOP, 'docs',
                                                 'add-cow-bench.md'))
    p.add_argument('--png', default=os.path.join(TOP, 'docs',
                                                 'add-cow-bench.png'))
    p.add_argument('--formats', default='')
    p.add_argument('--caches', default=','.join(CACHES))
    p.add_argument('--no-convert', action='store_true')
    a = p.parse_args()

    if os.path.exists(a.dir):
        shutil.rmtree(a.dir)
    os.makedirs(a.dir)
    fstype = subprocess.run(['stat', '-f', '-c', '%T', a.dir],
                            stdout=subprocess.PIPE,
                            universal_newlines=True).stdout.strip()
    if fstype in ('tmpfs', 'ramfs'):
        sys.exit('refusing to benchmark on %s (SEEK_DATA is slow there); '
                 'use --dir' % fstype)
    st = os.statvfs(a.dir)
    if st.f_bavail * st.f_bsize < 4 * a.size * MiB:
        sys.exit('not enough space in %s' % a.dir)

    # A private copy: others may relink the build while this runs
    global QEMU_IMG, QEMU_IO
    os.makedirs(os.path.join(a.dir, 'bin'))
    for prog in (QEMU_IMG, QEMU_IO):
        shutil.copy2(prog, os.path.join(a.dir, 'bin'))
    QEMU_IMG = os.path.join(a.dir, 'bin', 'qemu-img')
    QEMU_IO = os.path.join(a.dir, 'bin', 'qemu-io')

    started = datetime.datetime.now(datetime.timezone.utc)
    load0 = loadavg()
    b = Bench(a.dir, a.size * MiB, min(a.touch, a.size) * MiB, a.runs)
    b.make_base()
    formats = [f for f in FORMATS
               if not a.formats or f[0] in a.formats.split(',')]
    rss = {}
    for name, fmt, opts, backing in formats:
        if name in RSS_FORMATS:
            rss[name] = b.peak_rss(name, fmt, opts)
    caches = a.caches.split(',')
    for r in range(a.runs):
        # A different format goes first in each run, so that whatever the
        # first one pays (a cold cache, the previous step's writeback on a
        # shared disk) is not charged to the same format every time
        k = r * len(formats) // a.runs
        order = formats[k:] + formats[:k]
        for label in caches:
            for name, fmt, opts, backing in order:
                only = CACHES[label][2]
                if only and name not in only:
                    continue
                print('bench: run %d/%d %s, %s (load %s)' %
                      (r + 1, a.runs, name, label, loadavg()), flush=True)
                try:
                    b.run_format(name, fmt, opts, backing, label, r)
                except Failed as e:
                    # one lost sample, not a lost run (e.g. a stray kill)
                    print('bench: %s' % e, flush=True)
        if not a.no_convert:
            for name, fmt, opts, backing in order:
                if name != 'raw-prealloc':
                    print('bench: run %d/%d convert %s' % (r + 1, a.runs,
                                                           name), flush=True)
                    try:
                        b.run_convert(name, fmt, opts)
                    except Failed as e:
                        print('bench: %s' % e, flush=True)
        # a report after every run: an interrupted run still leaves one
        report(a, b, formats, rss, r + 1, started, load0, fstype)


if __name__ == '__main__':
    try:
        import matplotlib as _mpl  # noqa: F401
        del _mpl
    except ImportError:
        # make bench may find another python3 first; Debian's has it
        if os.path.exists('/usr/bin/python3') and \
           os.path.realpath(sys.executable) != \
           os.path.realpath('/usr/bin/python3') and \
           not os.environ.get('ADD_COW_BENCH_REEXEC'):
            os.environ['ADD_COW_BENCH_REEXEC'] = '1'
            os.execv('/usr/bin/python3', ['/usr/bin/python3'] + sys.argv)
    main()
