#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
#
# add-cow benchmark: every format on the same file system and build, in one
# run, reported as ratios to raw, to qcow2 and to qcow2 extended_l2=on, and
# checked against the targets of issue 15 for add-cow created with default
# options.
#
# Usage: scripts/bench.py [--runs N] [--size MiB] [--touch MiB]
#                         [--tib-writes N] [--convert MiB] [--no-convert]
#                         [--formats a,b|all] [--caches a,b] [--dir DIR]
#                         [--out docs/add-cow-bench.md] [--png ...]
#
# The defaults (5 runs, 6 GiB disk, 1 GiB sequential, 24576 writes on the
# 1 TiB disk) take about 1 h 40 min on a 2-CPU VM, so that every cell lasts
# about a second or more; a smoke run: --runs 1 --size 256 --touch 32
# --tib-writes 1024 --convert 64.  The estimate is printed at the start.
#
# Workloads use `qemu-img bench` (sequential / strided, queue depth 32) and
# `qemu-io` with a list of aio requests (random pattern).  Runs are
# interleaved (run 1 of every format, then run 2, ...) in an order rotated
# from run to run, so that a change in the machine's load hits all formats
# alike; the median is reported with min-max, and every ratio compares
# medians from the same invocation.  A target is called met or missed only
# when every pairing of the two formats' runs agrees on it; otherwise it is
# "within noise", with the range of the ratio.

import argparse
import datetime
import glob
import importlib.util
import json
import os
import platform
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.environ.get('BUILD_DIR', os.path.join(TOP, '.build', 'build'))
QEMU_IMG = os.path.join(BUILD, 'qemu-img')
QEMU_IO = os.path.join(BUILD, 'qemu-io')
MiB = 1024 * 1024
GiB = 1024 * MiB
TiB = 1024 * GiB

# name -> (format, create options, uses backing file)
FORMATS = [
    ('raw-prealloc', 'raw', ['-o', 'preallocation=full'], False),
    ('raw-sparse', 'raw', [], False),
    ('qcow2', 'qcow2', [], True),
    ('qcow2-l2ext', 'qcow2', ['-o', 'extended_l2=on'], True),
    ('qcow2-datafile', 'qcow2', ['-o', 'data_file={img}.data'], True),
    ('qed', 'qed', [], True),
    # created without any option: the targets apply to the default, whatever
    # its cluster size is
    ('add-cow', 'add-cow', [], True),
    ('add-cow-64k', 'add-cow', ['-o', 'cluster_size=64k'], True),
    ('add-cow-4k', 'add-cow', ['-o', 'cluster_size=4k'], True),
]

# The format the targets are evaluated for
DEFAULT = 'add-cow'

# Measured only when --formats names them: QED is an order of magnitude
# slower than the rest when it allocates, and would add half an hour
# Not measured unless named: QED (slow) and add-cow-4k (the default's
# geometry today, so it would measure the same thing twice)
OPTIONAL = ['qed', 'add-cow-4k']

# cache mode label -> (qemu -t, qemu -i, formats measured; None = all).
# The formats no target refers to are measured with the page cache only, to
# keep a run near an hour and a half on two cores.
CACHES = {
    'writeback': ('writeback', 'threads', None),
    'none-native': ('none', 'native',
                    ['raw-prealloc', 'raw-sparse', 'qcow2', 'qcow2-l2ext',
                     'add-cow', 'add-cow-64k', 'add-cow-4k']),
    'none-io_uring': ('none', 'io_uring',
                      ['raw-prealloc', 'raw-sparse', 'qcow2', 'qcow2-l2ext',
                       'add-cow', 'add-cow-64k']),
}

# The qemu-img bench workloads, in the order they run on one format:
#   (name, write, request size, step, requests per MiB of --touch,
#    flush interval, on a freshly created image)
# The request count is capped so that the requests fit in the virtual disk.
# The counts are chosen so that, with the defaults, every cell lasts about a
# second or more on the fastest format on a 2-CPU VM: the one-per-cluster
# workloads need up to 6 GiB of virtual disk for that.
WORKLOADS = [
    ('alloc seq 4k', True, 4096, 4096, 256, 0, True),
    # the same image, now allocated
    ('rewrite seq 4k', True, 4096, 4096, 256, 0, False),
    ('read allocated 4k', False, 4096, 4096, 256, 0, False),
    ('alloc 64k', True, 65536, 65536, 64, 0, True),
    ('alloc 4k/cluster', True, 4096, 65536, 96, 0, True),
    ('alloc 4k flush/32', True, 4096, 65536, 64, 32, True),
    ('read backing 64k', False, 65536, 65536, 80, 0, True),
]
# qemu-io, distinct random 4 KiB offsets over the whole virtual disk:
# requests per MiB of --touch
RANDOM_PER_MIB = 32

# The 1 TiB disk (no backing file): random 4 KiB allocating writes at
# --tib-writes distinct offsets, without and with a flush every 32 writes,
# in every cache mode; then qemu-img map, check and info on the result
TIB_FORMATS = ['raw-sparse', 'qcow2', 'qcow2-l2ext', 'add-cow', 'add-cow-4k',
               'add-cow-64k']
TIB_FLUSH = 32
# Each request in flight in qemu-io is a coroutine with its own stack
# mapping: past about 30000 at once they exceed vm.max_map_count
MAX_INFLIGHT = 16384
QUERIES = ['map', 'check', 'info']

# Peak RSS is measured for these (qcow2-like formats take long to allocate
# metadata all over a 1 TiB disk and add nothing to the comparison)
RSS_FORMATS = ['raw-sparse', 'qcow2', 'qcow2-l2ext', 'add-cow', 'add-cow-64k',
               'add-cow-4k']

# The targets of issue 15, for DEFAULT in every cache mode:
#   workload -> [(reference, minimum speed ratio)]
ALLOC = ['alloc seq 4k', 'alloc 64k', 'alloc 4k/cluster', 'alloc random 4k',
         'alloc 4k flush/32']
COW = ['alloc 4k/cluster', 'alloc random 4k', 'alloc 4k flush/32']
TARGETS = {}
for _w in ALLOC:
    TARGETS[_w] = [('qcow2-l2ext', 1.0), ('qcow2', 1.5 if _w in COW else 1.0)]
    if 'flush' not in _w:
        TARGETS[_w].append(('raw-sparse', 0.90))
TARGETS['rewrite seq 4k'] = [('raw-prealloc', 0.97)]
TARGETS['read allocated 4k'] = [('raw-prealloc', 0.97)]
TARGETS['read backing 64k'] = [('qcow2', 1.0)]
TARGETS['1 TiB random 4k'] = [('qcow2-l2ext', 1.0)]
TARGETS['1 TiB random 4k flush/%d' % TIB_FLUSH] = [('qcow2-l2ext', 1.0)]

# For the run-time estimate printed at the start only: microseconds per
# request on a 2-CPU VM (ext4 on a virtual disk), averaged over the
# cache modes; '*' for the formats not named.  STEP_S: creating the image,
# the sync before the step and starting the process.
EST_US = {
    'alloc seq 4k': {'*': 20, 'raw-prealloc': 8, 'raw-sparse': 15,
                     'qcow2-l2ext': 30, 'qed': 120},
    'rewrite seq 4k': {'*': 8},
    'read allocated 4k': {'*': 8},
    'alloc 64k': {'*': 130, 'raw-prealloc': 25, 'raw-sparse': 110,
                  'add-cow': 70, 'add-cow-64k': 70, 'add-cow-4k': 70,
                  'qed': 650},
    'alloc 4k/cluster': {'*': 110, 'raw-prealloc': 10, 'raw-sparse': 11,
                         'qcow2': 240, 'qcow2-datafile': 200,
                         'qcow2-l2ext': 75, 'add-cow-4k': 30, 'qed': 850},
    'alloc 4k flush/32': {'*': 160, 'raw-prealloc': 17, 'raw-sparse': 29,
                          'qcow2-l2ext': 70, 'add-cow-4k': 50, 'qed': 900},
    'read backing 64k': {'*': 33},
    'alloc random 4k': {'*': 160, 'raw-prealloc': 32, 'raw-sparse': 33,
                        'qcow2-l2ext': 90, 'add-cow-4k': 90, 'qed': 1100},
    '1 TiB random 4k': {'*': 160, 'raw-sparse': 45, 'qcow2': 750,
                        'qcow2-l2ext': 1000, 'add-cow-4k': 300},
    '1 TiB random 4k flush/%d' % TIB_FLUSH: {
        '*': 160, 'raw-sparse': 50, 'qcow2': 700, 'qcow2-l2ext': 950,
        'add-cow-4k': 250},
}
EST_STEP_S = 0.3
EST_QUERY_S = 1.0
EST_WRITE_MIBS = 400      # writing the base and raw-prealloc
EST_CONVERT_MIBS = 800


class Failed(Exception):
    pass


def _big_stack():
    # The room for a process's arguments is a quarter of its stack limit:
    # make room for a long qemu-io command line
    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    want = 256 * MiB
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_STACK, (want, hard))


# The peak RSS of a process that Python forks starts at Python's own (Linux
# keeps the high-water mark across exec), so a small process forks the
# measured one and reports its ru_maxrss: GNU time if there is one (about
# 1 MiB of its own), else Python without site (about 10 MiB)
TIME = '/usr/bin/time'
RSS_CHILD = ('import resource,subprocess,sys;'
             'r=subprocess.run(sys.argv[2:]).returncode;'
             'open(sys.argv[1],"w").write("%d\\n"%resource.getrusage('
             'resource.RUSAGE_CHILDREN).ru_maxrss);sys.exit(r)')


def run(args, usage=False):
    """Run args and return its output, with usage=True a tuple (output,
    wall-clock seconds, peak RSS in KiB)"""
    big = sum(len(x) + 9 for x in args) > 256 * 1024
    cmd = ' '.join(args) if not big else ' '.join(args[:12]) + ' ...'
    if usage:
        fd, rssfile = tempfile.mkstemp(prefix='bench-rss.')
        os.close(fd)
        if os.access(TIME, os.X_OK):
            args = [TIME, '-f', '%M', '-o', rssfile] + args
        else:
            args = [sys.executable, '-S', '-c', RSS_CHILD, rssfile] + args
    try:
        t0 = time.monotonic()
        r = subprocess.run(args, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, universal_newlines=True,
                           preexec_fn=_big_stack if big else None)
        t = time.monotonic() - t0
        if r.returncode:
            raise Failed('command failed (status %d): %s\n%s' %
                         (r.returncode, cmd, r.stdout))
        if not usage:
            return r.stdout
        with open(rssfile) as f:
            # GNU time puts a line about a failed command first
            return r.stdout, t, int(f.read().split()[-1])
    finally:
        if usage:
            os.unlink(rssfile)


def loadavg():
    with open('/proc/loadavg') as f:
        return ' '.join(f.read().split()[:3])


def duration(secs):
    secs = int(round(secs))
    if secs < 60:
        return '%d s' % secs
    if secs < 3600:
        return '%d min %02d s' % (secs // 60, secs % 60)
    return '%d h %02d min' % (secs // 3600, secs % 3600 // 60)


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


def rotated(items, r, runs):
    """The order of run r: a different item first in each run (as far as
    there are runs for it), and the others in reverse order every other run,
    so that no item always follows the same one"""
    if not items:
        return []
    k = r * len(items) // max(runs, 1) % len(items)
    order = items[k:] + items[:k]
    if r % 2:
        order = order[:1] + order[:0:-1]
    return order


class Bench:
    def __init__(self, workdir, size, touch, runs, tib_writes, convert):
        self.dir = workdir
        self.size = size
        self.convert = convert
        self.touch = touch
        self.runs = runs
        self.tib_writes = tib_writes
        self.base = os.path.join(workdir, 'base.raw')
        # raw-prealloc is the same fully written file for every step: it
        # allocates nothing, and rewriting it each time would cost minutes
        self.keep = os.path.join(workdir, 'keep.raw-prealloc')
        self.results = {}       # (workload, fmt) -> [seconds]
        self.queries = {}       # (query, fmt) -> [seconds]
        self.tib_rss = {}       # fmt -> [KiB], qemu-io 1 TiB flush/32
        self.lost = []          # failed steps
        self.default_cluster = '?'

    def path(self, name):
        return os.path.join(self.dir, name)

    def count(self, per, step):
        return max(1, min(per * self.touch // MiB, self.size // step))

    def make_base(self):
        run([QEMU_IMG, 'create', '-q', '-f', 'raw', '-o',
             'preallocation=full', self.base, str(self.size)])
        run([QEMU_IMG, 'bench', '-q', '-w', '-f', 'raw', '--pattern', '0x5a',
             '-s', '1M', '-c', str(self.size // MiB), '-t', 'none',
             '-i', 'native', self.base])
        # The cluster size of an add-cow image created without options
        img = self.path('img.probe')
        try:
            run([QEMU_IMG, 'create', '-q', '-f', 'add-cow', img, '64M'])
            info = json.loads(run([QEMU_IMG, 'info', '--output=json', img]))
            self.default_cluster = '%d KiB' % (info['cluster-size'] // 1024)
        except (Failed, ValueError, KeyError) as e:
            print('bench: no default cluster size: %s' % e)
        self.clean()

    def clean(self, prefix='img.'):
        for f in os.listdir(self.dir):
            if f.startswith(prefix):
                os.unlink(self.path(f))

    def create(self, fmt, opts, backing, img, size=None):
        self.clean()
        if img == self.keep:
            if not os.path.exists(img):
                run([QEMU_IMG, 'create', '-q', '-f', fmt] + opts +
                    [img, str(self.size)])
            return
        opts = [o.replace('{img}', img) for o in opts]
        args = [QEMU_IMG, 'create', '-q', '-f', fmt] + opts
        if backing:
            args += ['-b', self.base, '-F', 'raw']
        run(args + [img, str(size or self.size)])

    def timed(self, args):
        """(seconds, peak RSS KiB): qemu-img bench's own time if it prints
        one, else the whole process's"""
        # Dirty pages of the previous step must not be written meanwhile
        os.sync()
        out, t, rss = run(args, usage=True)
        m = re.search(r'Run completed in ([0-9.]+) seconds', out)
        return (float(m.group(1)) if m else t), rss

    def bench_args(self, fmt, cache, aio, write, bs, step, count,
                   flush=None):
        a = [QEMU_IMG, 'bench', '-f', fmt, '-t', cache, '-i', aio,
             '-d', '32', '-s', str(bs), '-S', str(step), '-c', str(count)]
        if write:
            a += ['-w', '--pattern', '0xa5']
        if flush:
            a += ['--flush-interval', str(flush)]
        return a

    def random_args(self, fmt, cache, aio, img, span, count, seed, flush=0):
        """qemu-io writing 4 KiB at count distinct random offsets below
        span, all submitted at once (up to MAX_INFLIGHT; with flush: a
        drain and a flush every flush requests), then waiting for them"""
        rnd = random.Random(seed)
        args = [QEMU_IO, '-f', fmt, '-t', cache, '-i', aio]
        for i, off in enumerate(rnd.sample(range(span // 4096), count)):
            args += ['-c', 'aio_write -q -P 0x3c %d 4k' % (off * 4096)]
            if flush and (i + 1) % flush == 0:
                # qemu-io's aio_flush only waits for the requests in flight
                args += ['-c', 'aio_flush', '-c', 'flush']
            elif (i + 1) % MAX_INFLIGHT == 0:
                args += ['-c', 'aio_flush']
        args += ['-c', 'aio_flush', img]
        return args

    def record(self, workload, name, secs):
        self.results.setdefault((workload, name), []).append(secs)

    def lose(self, what, e):
        # one lost sample, not a lost run (e.g. a stray kill)
        msg = str(e).strip().splitlines()
        self.lost.append('%s: %s' % (what, ' / '.join(msg[:3])[:400]))
        print('bench: %s: %s' % (what, e), flush=True)

    def run_format(self, name, fmt, opts, backing, label, seed):
        cache, aio, _ = CACHES[label]
        img = self.keep if name == 'raw-prealloc' else \
            self.path('img.' + name)
        sfx = ' (%s)' % label
        ok = True
        for i, (w, write, bs, step, per, flush, fresh) in \
                enumerate(WORKLOADS):
            if w == 'read backing 64k' and name == 'raw-sparse':
                # no backing file: it would read holes
                continue
            if not fresh and not ok:
                continue
            n = self.count(per, step)
            try:
                if fresh:
                    self.create(fmt, opts, backing, img)
                args = self.bench_args(fmt, cache, aio, write, bs, step, n,
                                       flush)
                self.record(w + sfx, name, self.timed(args + [img])[0])
                ok = ok or fresh
            except Failed as e:
                self.lose('%s, %s%s' % (name, w, sfx), e)
                if not fresh:
                    continue
                ok = False
                if not write or cache == 'writeback' or \
                        i + 1 == len(WORKLOADS) or WORKLOADS[i + 1][6]:
                    continue
                # The steps after it need the image written: write it
                # through the page cache, untimed (e.g. qcow2 with
                # extended_l2=on and aio=native: 10.2.2's linux-aio recurses
                # between completion and submission until the stack
                # overflows)
                try:
                    self.create(fmt, opts, backing, img)
                    run(self.bench_args(fmt, 'writeback', 'threads', write,
                                        bs, step, n, flush) + [img])
                    self.lost[-1] += (' (the image was then written with '
                                      'cache=writeback for the next steps)')
                    ok = True
                except Failed as e2:
                    self.lose('%s, %s%s, with cache=writeback' %
                              (name, w, sfx), e2)
        try:
            self.create(fmt, opts, backing, img)
            n = self.count(RANDOM_PER_MIB, 4096)
            secs, _ = self.timed(self.random_args(fmt, cache, aio, img,
                                                  self.size, n, seed))
            self.record('alloc random 4k' + sfx, name, secs)
        except Failed as e:
            self.lose('%s, alloc random 4k%s' % (name, sfx), e)

    def run_tib(self, name, fmt, opts, label, seed, queries):
        """Random 4 KiB allocating writes all over a 1 TiB disk, without
        and with a flush every TIB_FLUSH writes; with queries, then time
        qemu-img map, check and info on the image, its files out of the
        page cache"""
        cache, aio, _ = CACHES[label]
        img = self.path('img.tib.' + name)
        opts = [o for o in opts if 'preallocation' not in o]
        written = False
        for flush in (0, TIB_FLUSH):
            w = '1 TiB random 4k%s (%s)' % (
                ' flush/%d' % flush if flush else '', label)
            try:
                self.create(fmt, opts, False, img, size=TiB)
                secs, rss = self.timed(self.random_args(
                    fmt, cache, aio, img, TiB, self.tib_writes, seed, flush))
                self.record(w, name, secs)
                if flush:
                    # without flushes, the requests' coroutines dominate
                    self.tib_rss.setdefault(name, []).append(rss)
                written = True
            except Failed as e:
                written = False
                self.lose('%s, %s' % (name, w), e)
        if not queries or not written:
            return
        for q in QUERIES:
            if q == 'check' and fmt == 'raw':
                continue        # raw has nothing to check
            self.drop_cache(img)
            try:
                secs, _ = self.timed([QEMU_IMG, q, '-f', fmt, img])
                self.queries.setdefault((q, name), []).append(secs)
            except Failed as e:
                self.lose('%s, qemu-img %s, 1 TiB' % (name, q), e)

    def drop_cache(self, img):
        os.sync()
        for f in glob.glob(img + '*'):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    def run_convert(self, name, fmt, opts):
        """qemu-img convert of the first self.convert bytes of the base"""
        out = self.path('img.' + name)
        self.clean()
        o = [x.replace('{img}', out) for x in opts]
        # The O_DIRECT workloads leave the base out of the page cache: read
        # it once, or the first format converted pays for a cold read
        with open(self.base, 'rb') as f:
            left = self.convert
            while left > 0 and f.read(min(left, 8 * MiB)):
                left -= 8 * MiB
        src = 'driver=raw,size=%d,file.driver=file,file.filename=%s' % (
            self.convert, self.base)
        try:
            self.record('convert %d MiB' % (self.convert // MiB), name,
                        self.timed([QEMU_IMG, 'convert', '--image-opts',
                                    src, '-O', fmt] + o + [out])[0])
        except Failed as e:
            self.lose('%s, convert' % name, e)
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
        peak = 0
        for w in (['-w'], []):
            _, _, rss = run([QEMU_IMG, 'bench', '-f', fmt, '-c', '2048',
                             '-s', '4k', '-S', str(512 * MiB)] + w + [img],
                            usage=True)
            peak = max(peak, rss)
        self.clean('img.rss.')
        return peak

    def estimate(self, plan, tib_plan, conv, nrss):
        """Expected seconds for the whole invocation (EST_US)"""
        def us(w, name):
            e = EST_US.get(w, {})
            return e.get(name, e.get('*', 100)) / 1e6

        t = (2 * self.size / MiB / EST_WRITE_MIBS + nrss * 2.0)
        per_run = 0.0
        for label, fl in plan:
            for name, _, _, _ in fl:
                for w, write, bs, step, per, flush, fresh in WORKLOADS:
                    if w == 'read backing 64k' and name == 'raw-sparse':
                        continue
                    per_run += (self.count(per, step) * us(w, name) +
                                EST_STEP_S)
                per_run += (self.count(RANDOM_PER_MIB, 4096) *
                            us('alloc random 4k', name) + EST_STEP_S)
        for i, (label, fl) in enumerate(tib_plan):
            for name, fmt, _, _ in fl:
                for w in ('1 TiB random 4k',
                          '1 TiB random 4k flush/%d' % TIB_FLUSH):
                    per_run += self.tib_writes * us(w, name) + EST_STEP_S
                if i == 0:
                    per_run += len(QUERIES) * EST_QUERY_S
        per_run += len(conv) * (self.convert / MiB / EST_CONVERT_MIBS +
                                EST_STEP_S)
        return t + self.runs * per_run


def ratio(x, ref):
    """Speed ratio ref/x of two lists of seconds: (ratio of the medians,
    lowest and highest ratio of any two runs)"""
    return (statistics.median(ref) / statistics.median(x),
            min(ref) / max(x), max(ref) / min(x))


def verdict(lo, hi, want):
    if lo >= want:
        return 'met'
    if hi < want:
        return 'MISSED'
    return 'within noise'


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
    fig, axes = plt.subplots(2, 1, figsize=(20, 10))
    for ax, key, title in ((axes[0], 'qcow2', 'speed relative to qcow2'),
                           (axes[1], 'raw',
                            'speed relative to raw-prealloc (convert and '
                            '1 TiB: raw-sparse)')):
        width = 0.8 / len(formats)
        for i, n in enumerate(formats):
            ys = [min(ratios[w].get((n, key)) or 0, 4) for w in ws]
            ax.bar([x + i * width for x in range(len(ws))], ys, width,
                   label=n)
        ax.axhline(1.0, color='black', linewidth=0.8)
        ax.set_xticks([x + 0.4 for x in range(len(ws))])
        ax.set_xticklabels(ws, rotation=35, ha='right', fontsize=7)
        ax.set_ylabel(title + ' (higher is faster, cut at 4)', fontsize=8)
        ax.legend(fontsize=7, ncol=5)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    print('bench: chart in %s' % path)


def chart_from_report(md, png):
    """Redraw the chart of a report written earlier (--chart-only): the
    ratios of every "| format | seconds | ..." table"""
    formats, workloads, ratios, w, table = [], [], {}, None, False
    with open(md) as f:
        report = f.read().splitlines()
    for line in report:
        if line.startswith('## '):
            w, table = line[3:].strip(), False
            continue
        cells = [c.strip() for c in line.strip().strip('|').split('|')]
        if cells[:2] == ['format', 'seconds']:
            table = True
            continue
        if not table or len(cells) < 4 or not cells[2].endswith('x'):
            continue
        if w not in ratios:
            workloads.append(w)
            ratios[w] = {}
        if cells[0] not in formats:
            formats.append(cells[0])
        ratios[w][(cells[0], 'raw')] = float(cells[2][:-1])
        ratios[w][(cells[0], 'qcow2')] = float(cells[3][:-1])
    chart(png, formats, workloads, ratios)


def split(w):
    """'alloc 64k (writeback)' -> ('alloc 64k', 'writeback')"""
    m = re.match(r'(.*) \((.*)\)$', w)
    return (m.group(1), m.group(2)) if m else (w, None)


def report(a, b, formats, plan, rss, done, started, load0, fstype, est):
    load1 = loadavg()
    now = datetime.datetime.now(datetime.timezone.utc)
    names = [n for n, _, _, _ in formats]

    # cache mode by cache mode, in the order the workloads run
    names_w = [w[0] for w in WORKLOADS] + ['alloc random 4k'] + \
        ['1 TiB random 4k' + x for x in ('', ' flush/%d' % TIB_FLUSH)]
    order = ['%s (%s)' % (w, label) for label, _ in plan for w in names_w]
    present = []
    for (w, _) in b.results:
        if w not in present:
            present.append(w)
    workloads = [w for w in order if w in present] + \
        [w for w in present if w not in order]
    cells = [(statistics.median(v), w, n) for (w, n), v in b.results.items()]

    n = {w[0]: b.count(w[4], w[3]) for w in WORKLOADS}
    lines = [
        '# add-cow benchmark', '',
        '<!-- Written by scripts/bench.py (make bench); do not edit. '
        'Notes on the optimisations: add-cow-performance.md -->', '',
        '- Date: %s to %s UTC' % (
            started.strftime('%Y-%m-%d %H:%M'), now.strftime('%H:%M')),
        '- Duration: %s for %d of %d runs (estimated at the start: %s for '
        'all)' % (duration((now - started).total_seconds()), done, b.runs,
                  duration(est)),
        '- Machine: %s' % machine(),
        '- File system: %s (%s); QEMU build %s' % (a.dir, fstype, BUILD),
        '- Load average (1/5/15 min) at start %s, at end %s' % (
            load0, load1),
        '- Command: `%s`' % ' '.join(['scripts/bench.py'] + sys.argv[1:]),
        '- add-cow: created without options (cluster size %s); add-cow-64k '
        '(and add-cow-4k if measured) with `-o cluster_size=...`'
        % b.default_cluster,
        '- Cache modes: %s' % '; '.join(
            '%s (%s)' % (label, 'every format' if len(fl) == len(formats)
                         else ', '.join(n for n, _, _, _ in fl))
            for label, fl in plan),
    ]
    if cells:
        short = min(cells)
        lines.append('- Shortest cell: %.3f s median (%s, %s); %d of %d '
                     'cells under 1 s' % (short[0], short[2], short[1],
                                          sum(1 for c in cells if c[0] < 1),
                                          len(cells)))
    if b.lost:
        lines.append('- Lost samples (failed steps): %d, listed at the end'
                     % len(b.lost))
    lines += [
        '',
        'Each cell: median seconds of %d runs (min-max; the formats run in '
        'a rotated order, a different one first in each run and the others '
        'reversed every other run; the cache modes rotate too), then the '
        'speed ratio of the medians (reference time / time: higher is '
        'faster) to raw-preallocated (convert and 1 TiB: raw-sparse), to '
        'qcow2 and to qcow2 `extended_l2=on` of the same cache mode, from '
        'this invocation. Virtual disk %d MiB, through a raw backing file '
        'full of non-zero data; queue depth 32 (qemu-img bench). Requests: '
        '%d sequential 4 KiB (alloc seq, then rewrite and read of the same '
        'image), %d x 64 KiB, %d x 4 KiB one per 64 KiB (%d with a flush '
        'every 32, `--flush-interval 32`, which drains first), %d x 64 KiB '
        'reads through to the backing file (not raw-sparse: it has none). '
        'raw-prealloc is one fully written file used for every step. '
        'Timings are qemu-img bench\'s own (open and close excluded); the '
        'random workload times a whole qemu-io process (%d aio_write '
        'requests at distinct random 4 KiB offsets over the whole disk, '
        'submitted at once, at most %d in flight, then aio_flush and close), '
        'so its ratios include open and close.'
        % (done, b.size // MiB, n['alloc seq 4k'], n['alloc 64k'],
           n['alloc 4k/cluster'], n['alloc 4k flush/32'],
           n['read backing 64k'], b.count(RANDOM_PER_MIB, 4096),
           MAX_INFLIGHT), '']
    if b.tib_writes:
        lines += [
            '1 TiB: a 1 TiB disk without backing file, %d aio_write of '
            '4 KiB at distinct random offsets over the whole disk (the same '
            'offsets for every format in a run), timed as a whole qemu-io '
            'process, once with all requests submitted at once (at most '
            '%d in flight: an `aio_flush` between batches) and once with '
            '`aio_flush` (qemu-io\'s waits for the requests in flight) and '
            '`flush` every %d writes. The reference for "vs raw" is '
            'raw-sparse.' % (b.tib_writes, MAX_INFLIGHT, TIB_FLUSH), '']

    ratios = {}
    summary = []
    for w in workloads:
        base, label = split(w)
        conv = base.startswith('convert')
        rawref = 'raw-sparse' if conv or base.startswith('1 TiB') else \
            'raw-prealloc'
        refs = [rawref, 'qcow2', 'qcow2-l2ext']
        lines += ['## ' + w, '',
                  '| format | seconds | vs %s | vs qcow2 | vs qcow2-l2ext |'
                  % ('raw' if conv else rawref), '|---|---|---|---|---|']
        rr = ratios.setdefault(w, {})
        for name in names:
            vals = b.results.get((w, name))
            if not vals:
                continue
            cols = []
            for ref in refs:
                rv = b.results.get((w, ref))
                r = ratio(vals, rv)[0] if rv else None
                cols.append('%.2fx' % r if r else '-')
                rr[(name, 'raw' if ref == rawref else ref)] = r
            lines.append('| %s | %.3f (%.3f-%.3f) | %s |' % (
                name, statistics.median(vals), min(vals), max(vals),
                ' | '.join(cols)))
        lines.append('')
        x = b.results.get((w, DEFAULT))
        for ref, want in TARGETS.get(base, []):
            rv = b.results.get((w, ref))
            if x and rv:
                med, lo, hi = ratio(x, rv)
                summary.append('| %s | %s | %.2fx | %.2f-%.2fx | >= %.2fx | '
                               '%s |' % (w, ref, med, lo, hi, want,
                                         verdict(lo, hi, want)))

    lines += ['For convert (`qemu-img convert` of the first %d MiB of the '
              'backing file), the first ratio is to raw (sparse): the same '
              'conversion into a raw file.' % (b.convert // MiB), '']
    if b.queries:
        lines += ['## qemu-img on the 1 TiB disks', '',
                  'Seconds for one `qemu-img map`, `check` and `info` '
                  '(median of the runs, min-max) on the image written by the '
                  'flush/%d workload, after `sync` and `posix_fadvise('
                  'DONTNEED)` on its files so that it reads from the disk, '
                  'not the page cache; then the largest peak RSS of the '
                  'qemu-io processes of the flush/%d workload (every cache '
                  'mode; at most %d requests in flight; the command line '
                  'alone is about %d KiB).' %
                  (TIB_FLUSH, TIB_FLUSH, TIB_FLUSH,
                   b.tib_writes * 48 // 1024), '',
                  '| format | %s | qemu-io peak RSS (KiB) |' %
                  ' | '.join('qemu-img ' + q for q in QUERIES),
                  '|---|%s---|' % ('---|' * len(QUERIES))]
        for name in names:
            cols = []
            for q in QUERIES:
                v = b.queries.get((q, name))
                cols.append('%.3f (%.3f-%.3f)' % (
                    statistics.median(v), min(v), max(v)) if v else '-')
            if any(c != '-' for c in cols):
                r = b.tib_rss.get(name)
                lines.append('| %s | %s | %s |' % (
                    name, ' | '.join(cols), max(r) if r else '-'))
        lines.append('')
    lines += ['## Peak RSS, 1 TiB virtual disk', '',
              'qemu-img bench writes 4 KiB every 512 MiB (2048 requests, '
              'no backing file), then reads the same pattern; the larger '
              'peak RSS of the two processes.', '',
              '| format | peak RSS (KiB) | vs qcow2 |', '|---|---|---|']
    for name, kib in rss.items():
        lines.append('| %s | %d | %.2fx |' % (name, kib,
                                              kib / rss.get('qcow2', kib)))
    lines.append('')
    if DEFAULT in rss and 'qcow2' in rss:
        r = rss[DEFAULT] / rss['qcow2']
        summary.append('| peak RSS, 1 TiB | qcow2 | %.2fx | one run | '
                       '<= 1.00x | %s |' % (r, 'met' if r <= 1 else 'MISSED'))
    if b.lost:
        lines += ['## Lost samples', ''] + ['- ' + x for x in b.lost] + ['']
    if summary:
        verdicts = [s.rsplit('|', 2)[1].strip() for s in summary]
        head = ['## Targets (%s, default options)' % DEFAULT, '',
                'Issue 15\'s targets. Ratio: of the medians (higher is '
                'faster; for RSS, lower is smaller). Range: from the slowest '
                '%s run against the fastest reference run to the fastest '
                'against the slowest. A target is met or MISSED only when '
                'the whole range is on one side of it; otherwise the two '
                'cannot be told apart on this machine: "within noise".'
                % DEFAULT, '',
                '%d met, %d MISSED, %d within noise.' % (
                    verdicts.count('met'), verdicts.count('MISSED'),
                    verdicts.count('within noise')), '',
                '| workload | reference | ratio | range | target | |',
                '|---|---|---|---|---|---|'] + summary + ['']
        i = lines.index('## ' + workloads[0]) if workloads else len(lines)
        lines[i:i] = head
    with open(a.out, 'w') as f:
        f.write('\n'.join(lines))
    print('\n'.join(lines))
    chart(a.png, names, workloads, ratios)


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--runs', type=int, default=5)
    p.add_argument('--size', type=int, default=6144,
                   help='virtual disk size, MiB')
    p.add_argument('--touch', type=int, default=1024,
                   help='MiB the sequential 4 KiB workloads cover; the '
                   'others scale with it (capped at --size)')
    p.add_argument('--tib-writes', type=int, default=24576,
                   help='random 4 KiB writes on the 1 TiB disk (0: skip)')
    p.add_argument('--dir', default=os.path.join(TOP, '.build', 'bench'))
    p.add_argument('--out', default=os.path.join(TOP, 'docs',
                                                 'add-cow-bench.md'))
    p.add_argument('--png', default=os.path.join(TOP, 'docs',
                                                 'add-cow-bench.png'))
    p.add_argument('--formats', default='',
                   help='comma-separated, or "all" (default: all but %s)'
                   % ', '.join(OPTIONAL))
    p.add_argument('--caches', default=','.join(CACHES))
    p.add_argument('--convert', type=int, default=2048,
                   help='MiB of the backing file converted into each format')
    p.add_argument('--no-convert', action='store_true')
    p.add_argument('--chart-only', action='store_true',
                   help='only redraw --png from the report in --out')
    a = p.parse_args()
    if a.chart_only:
        chart_from_report(a.out, a.png)
        return

    caches = a.caches.split(',')
    for label in caches:
        if label not in CACHES:
            sys.exit('unknown cache mode %s (%s)' % (label, ', '.join(CACHES)))
    if a.formats == 'all':
        formats = FORMATS
    elif a.formats:
        formats = [f for f in FORMATS if f[0] in a.formats.split(',')]
        unknown = set(a.formats.split(',')) - set(f[0] for f in FORMATS)
        if unknown:
            sys.exit('unknown format %s (%s)' % (
                ', '.join(sorted(unknown)), ', '.join(f[0] for f in FORMATS)))
    else:
        formats = [f for f in FORMATS if f[0] not in OPTIONAL]

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
    # base, raw-prealloc, an image, a conversion; the 1 TiB images
    need = (3 * a.size + a.convert) * MiB + 2 * a.tib_writes * 65536 + GiB
    if st.f_bavail * st.f_bsize < need:
        sys.exit('not enough space in %s (%d MiB needed)' % (
            a.dir, need // MiB))

    # A private copy: others may relink the build while this runs
    global QEMU_IMG, QEMU_IO
    os.makedirs(os.path.join(a.dir, 'bin'))
    for prog in (QEMU_IMG, QEMU_IO):
        shutil.copy2(prog, os.path.join(a.dir, 'bin'))
    QEMU_IMG = os.path.join(a.dir, 'bin', 'qemu-img')
    QEMU_IO = os.path.join(a.dir, 'bin', 'qemu-io')

    b = Bench(a.dir, a.size * MiB, min(a.touch, a.size) * MiB, a.runs,
              a.tib_writes, min(a.convert, a.size) * MiB)
    plan = []
    for label in caches:
        only = CACHES[label][2]
        plan.append((label, [f for f in formats if not only or f[0] in only]))
    tib = [f for f in formats if f[0] in TIB_FORMATS] if a.tib_writes else []
    tib_plan = [(label, tib) for label in caches] if tib else []
    # qemu-img map/check/info after the writes of one cache mode
    qlabel = 'writeback' if 'writeback' in caches else caches[0]
    conv = [] if a.no_convert else \
        [f for f in formats if f[0] != 'raw-prealloc']
    rss_formats = [f for f in formats if f[0] in RSS_FORMATS]

    started = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.monotonic()
    load0 = loadavg()
    est = b.estimate(plan, tib_plan, conv, len(rss_formats))
    print('bench: %d runs, expected run time about %s (until about %s UTC)'
          % (a.runs, duration(est),
             (started + datetime.timedelta(seconds=est)).strftime('%H:%M')),
          flush=True)
    b.make_base()
    rss = {}
    for name, fmt, opts, backing in rss_formats:
        try:
            rss[name] = b.peak_rss(name, fmt, opts)
        except Failed as e:
            b.lose('%s, peak RSS' % name, e)
    for r in range(a.runs):
        # A different format goes first in each run, so that whatever the
        # first one pays (a cold cache, the previous step's writeback on a
        # shared disk) is not charged to the same format every time; the
        # cache modes take turns too
        k = r % len(plan)
        for label, fl in plan[k:] + plan[:k]:
            for name, fmt, opts, backing in rotated(fl, r, a.runs):
                print('bench: run %d/%d %s, %s (load %s)' %
                      (r + 1, a.runs, name, label, loadavg()), flush=True)
                b.run_format(name, fmt, opts, backing, label, r)
        for label, fl in tib_plan[k:] + tib_plan[:k]:
            for name, fmt, opts, backing in rotated(fl, r, a.runs):
                print('bench: run %d/%d 1 TiB %s, %s (load %s)' %
                      (r + 1, a.runs, name, label, loadavg()), flush=True)
                b.run_tib(name, fmt, opts, label, 1000 + r, label == qlabel)
        for name, fmt, opts, backing in rotated(conv, r, a.runs):
            print('bench: run %d/%d convert %s' % (r + 1, a.runs, name),
                  flush=True)
            b.run_convert(name, fmt, opts)
        # a report after every run: an interrupted run still leaves one
        report(a, b, formats, plan, rss, r + 1, started, load0, fstype, est)
        spent = time.monotonic() - t0
        left = spent / (r + 1) * (a.runs - r - 1)
        print('bench: run %d/%d done, %s so far (estimated %s at the start)%s'
              % (r + 1, a.runs, duration(spent), duration(est),
                 '; about %s left' % duration(left) if left else ''),
              flush=True)


if __name__ == '__main__':
    if importlib.util.find_spec('matplotlib') is None:
        # make bench may find another python3 first; Debian's has it
        if os.path.exists('/usr/bin/python3') and \
           os.path.realpath(sys.executable) != \
           os.path.realpath('/usr/bin/python3') and \
           not os.environ.get('ADD_COW_BENCH_REEXEC'):
            os.environ['ADD_COW_BENCH_REEXEC'] = '1'
            os.execv('/usr/bin/python3', ['/usr/bin/python3'] + sys.argv)
    main()
