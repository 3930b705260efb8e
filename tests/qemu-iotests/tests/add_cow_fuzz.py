#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Mutation fuzzer for add-cow images (docs/specs/add-cow.txt)
#
# Copyright (c) 2026 The add-cow authors
#
# Seeds are valid add-cow images of every cluster size (512 B .. 2 MiB),
# with and without a backing file, with bits set in their bitmaps, all made
# by qemu-img/qemu-io at run time.  Each case copies one seed's .add-cow
# file, applies one to three mutations (header fields, format fields, names
# and their locations, the bitmap, truncation) and runs
#
#   qemu-img info -f add-cow          (read-only open, no image file)
#   qemu-img check -f add-cow         (read-only, opens the image file)
#   qemu-io -f add-cow -c 'read ..' -c map   (read-write open)
#
# each under a timeout.  A case fails on:
#   - a crash (death by signal, including assertion failures),
#   - a hang (timeout),
#   - a sanitizer report (ASan, UBSan, LSan) in stderr,
#   - an unclear rejection (non-zero exit without an error message),
#   - a modification of the .add-cow file by info or check, or by a
#     qemu-io open that failed, or of the image/backing file by anything.
#
# Used by the iotest tests/add-cow-fuzz (short deterministic replay) and
# standalone for long runs:
#
#   add_cow_fuzz.py --qemu-img B/qemu-img --qemu-io B/qemu-io \
#       --dir /tmp/fuzz --seed 1 --cases 1000000 --duration 1800 --jobs 2

import argparse
import hashlib
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time

MAGIC = b'ACOW'

# name -> (offset, struct format) of the fixed 128-byte header
FIELDS = {
    'magic': (0, '<I'),
    'header_size': (4, '<I'),
    'cluster_bits': (8, '<I'),
    'reserved0': (12, '<I'),
    'incompatible_features': (16, '<Q'),
    'compatible_features': (24, '<Q'),
    'autoclear_features': (32, '<Q'),
    'virtual_size': (40, '<Q'),
    'bitmap_offset': (48, '<Q'),
    'bitmap_size': (56, '<Q'),
    'image_name_offset': (64, '<I'),
    'image_name_size': (68, '<I'),
    'backing_name_offset': (72, '<I'),
    'backing_name_size': (76, '<I'),
}
IMAGE_FORMAT_OFF = 80
BACKING_FORMAT_OFF = 96
RESERVED1_OFF = 112
FMT_SIZE = 16

CLUSTER_BITS = list(range(9, 22))

SANITIZER_MARKERS = (
    b'ERROR: AddressSanitizer',
    b'ERROR: LeakSanitizer',
    b'runtime error:',          # UBSan
    b'SUMMARY: AddressSanitizer',
    b'SUMMARY: UndefinedBehaviorSanitizer',
    b'Assertion',
)


def sha256(path):
    try:
        with open(path, 'rb') as f:
            return hashlib.sha256(f.read()).hexdigest()
    except FileNotFoundError:
        return None


class Seed:
    """A valid add-cow image, its image file and (maybe) its backing file"""

    def __init__(self, directory, cluster_bits, backing):
        self.dir = directory
        self.cluster_bits = cluster_bits
        self.backing = backing
        self.path = os.path.join(directory, 'seed.add-cow')
        self.data = None
        self.size = 0
        self.protected = []     # files no command may modify: path -> hash


def run(cmd, timeout=60):
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=timeout, check=False)


def make_seeds(qemu_img, qemu_io, workdir):
    """Create the seed corpus: every cluster size, with/without backing"""
    seeds = []
    for cb in CLUSTER_BITS:
        cs = 1 << cb
        for backing in (False, True):
            d = os.path.join(workdir, f'seed-{cs}-{"b" if backing else "n"}')
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(d)
            s = Seed(d, cb, backing)
            # 5 clusters and a partial one, at least 64 KiB + 512
            s.size = max(5 * cs + cs // 2, 65536 + 512)
            s.size -= s.size % 512
            create = [qemu_img, 'create', '-q', '-f', 'add-cow',
                      '-o', f'cluster_size={cs}']
            if backing:
                base = os.path.join(d, 'base.raw')
                with open(base, 'wb') as f:
                    f.write(bytes([0x42]) * s.size)
                create += ['-b', 'base.raw', '-F', 'raw']
            r = run(create + [s.path, str(s.size)])
            if r.returncode != 0:
                raise RuntimeError(f'seed creation failed: {r.stderr!r}')
            # Set some bits: a partial write in cluster 1, all of cluster 3
            r = run([qemu_io, '-f', 'add-cow',
                     '-c', f'write -P 0x11 {cs + 512} 512',
                     '-c', f'write -P 0x33 {3 * cs} {cs}', s.path])
            if r.returncode != 0:
                raise RuntimeError(f'seed write failed: {r.stderr!r}')
            with open(s.path, 'rb') as f:
                s.data = f.read()
            s.protected = [os.path.join(d, n) for n in os.listdir(d)
                           if n != 'seed.add-cow']
            seeds.append(s)
    return seeds


# ---- mutations -------------------------------------------------------

INTERESTING32 = [0, 1, 2, 7, 8, 9, 21, 22, 31, 32, 63, 64, 127, 128, 129,
                 255, 256, 511, 512, 513, 4095, 4096, 4097, 16383, 16384,
                 16385, 65535, 65536, 1 << 20, (1 << 20) + 1, 1 << 24,
                 0x7fffffff, 0x80000000, 0xfffffe00, 0xffffffff]
INTERESTING64 = INTERESTING32 + [
    1 << 32, (1 << 32) + 512, 1 << 40, 1 << 50, 1 << 55, 1 << 62, 1 << 63,
    (1 << 63) - 512, (1 << 64) - 512, (1 << 64) - 1, 0x7ffffffffffffe00]


def get_field(buf, name):
    off, fmt = FIELDS[name]
    return struct.unpack_from(fmt, buf, off)[0]


def set_field(buf, name, value):
    off, fmt = FIELDS[name]
    bits = 32 if fmt == '<I' else 64
    struct.pack_into(fmt, buf, off, value & ((1 << bits) - 1))


def mut_field(rng, buf, seed):
    name = rng.choice(list(FIELDS))
    old = get_field(buf, name)
    is64 = FIELDS[name][1] == '<Q'
    choice = rng.randrange(6)
    if choice == 0:
        v = rng.choice(INTERESTING64 if is64 else INTERESTING32)
    elif choice == 1:
        v = old + rng.choice([-512, -1, 1, 512, 4096, -4096])
    elif choice == 2:
        v = old ^ (1 << rng.randrange(64 if is64 else 32))
    elif choice == 3:
        v = old * rng.choice([2, 8, 1 << 10, 1 << 20])
    elif choice == 4:
        v = old >> rng.randrange(1, 8)
    else:
        v = rng.getrandbits(64 if is64 else 32)
    set_field(buf, name, v)
    return f'{name}={v & ((1 << (64 if is64 else 32)) - 1):#x}'


def mut_geometry(rng, buf, seed):
    """Consistent-looking but wrong geometry: size/bitmap disagreements"""
    cb = get_field(buf, 'cluster_bits')
    choice = rng.randrange(4)
    if choice == 0:
        # Larger virtual size with a matching bitmap size: bitmap past EOF
        vs = rng.choice([1 << 30, 1 << 40, 1 << 50, (1 << 63) - 512])
        nb = -(-vs // (1 << min(cb, 63)))
        set_field(buf, 'virtual_size', vs)
        set_field(buf, 'bitmap_size', ((nb + 7) // 8 + 511) // 512 * 512)
        return f'vs={vs:#x}+bitmap'
    if choice == 1:
        # Different cluster size, same bitmap
        v = rng.choice(CLUSTER_BITS + [0, 8, 22, 63, 64])
        set_field(buf, 'cluster_bits', v)
        return f'cluster_bits={v}'
    if choice == 2:
        v = rng.choice([0, 128, 512, 1024, 4096, 1 << 20, (1 << 20) + 512])
        set_field(buf, 'header_size', v)
        return f'header_size={v}'
    v = rng.choice([0, 128, 512, 4096, 16384 - 512, 16384 + 512,
                    len(buf), len(buf) + 512, 1 << 40])
    set_field(buf, 'bitmap_offset', v)
    return f'bitmap_offset={v}'


FORMAT_VALUES = [b'', b'raw', b'qcow2', b'add-cow', b'qed', b'vmdk', b'luks',
                 b'file', b'blkdebug', b'null-co', b'nbd', b'json',
                 b'raw\0garbage', b'x' * 16, b'x' * 15, b'\xff' * 8,
                 b'RAW', b'../raw', b'raw ', b'vvfat', b'host_device']


def mut_format(rng, buf, seed):
    off = rng.choice([IMAGE_FORMAT_OFF, BACKING_FORMAT_OFF])
    v = rng.choice(FORMAT_VALUES)
    buf[off:off + FMT_SIZE] = v[:FMT_SIZE].ljust(FMT_SIZE, b'\0')
    return f'fmt@{off}={v!r}'


NAME_VALUES = [
    b'seed.add-cow', b'./seed.add-cow', b'/dev/null', b'/dev/zero',
    b'/nonexistent/file', b'', b'\0', b'a\0b', b'..', b'.', b'/', b'//',
    b'base.raw', b'seed.add-cow.img', b'nbd://127.0.0.1:1/x',
    b'json:{"driver":"null-co"}', b'json:{"driver":"file","filename":"x"}',
    b'file:seed.add-cow', b'null-co://', b'/proc/self/mem',
    b'x' * 4095, b'x' * 4096, b'\xff\xfe', b'%s%s%n', b'a' * 300,
    b'case.add-cow',            # the case itself (see mut_name)
]


def mut_name(rng, buf, seed):
    which = rng.choice(['image', 'backing'])
    v = rng.choice(NAME_VALUES)
    if which == 'backing' and v == b'case.add-cow':
        # A backing file that is the image itself makes every read-only
        # open recurse without end, for qcow2 as much as for add-cow
        # (generic block layer, see docs/add-cow-testing-faults.md).
        v = b'seed.add-cow'
    choice = rng.randrange(3)
    if choice == 0:
        # New name in the name area (after the existing names)
        off = 1024
        if off + len(v) > len(buf):
            buf.extend(b'\0' * (off + len(v) - len(buf)))
        buf[off:off + len(v)] = v
        set_field(buf, f'{which}_name_offset', off)
        set_field(buf, f'{which}_name_size', len(v))
        return f'{which}_name={v[:40]!r}'
    if choice == 1:
        # Location nonsense: overlap, inside the fixed header, in the bitmap
        off = rng.choice([0, 64, 127, 128, 129, 16383, 16384, len(buf) - 1,
                          len(buf), 1 << 31, 0xffffffff])
        size = rng.choice([0, 1, 4, 13, 255, 4095, 4096, 1 << 20,
                           0xffffffff])
        set_field(buf, f'{which}_name_offset', off)
        set_field(buf, f'{which}_name_size', size)
        return f'{which}_name@{off:#x}+{size:#x}'
    # Overwrite the bytes of the current name in place
    off = get_field(buf, f'{which}_name_offset')
    size = get_field(buf, f'{which}_name_size')
    if off and size and off + size <= len(buf):
        pos = off + rng.randrange(size)
        buf[pos] = rng.choice([0, 0x2f, 0x2e, 0xff, rng.randrange(256)])
        return f'{which}_name[{pos - off}]={buf[pos]:#x}'
    return 'noop'


def mut_bitmap(rng, buf, seed):
    bo = get_field(buf, 'bitmap_offset')
    bs = get_field(buf, 'bitmap_size')
    if bo >= len(buf):
        return 'noop'
    end = min(len(buf), bo + bs)
    choice = rng.randrange(4)
    if choice == 0:
        buf[bo:end] = b'\xff' * (end - bo)
        return 'bitmap=ff'
    if choice == 1:
        buf[bo:end] = bytes(rng.getrandbits(8) for _ in range(end - bo))
        return 'bitmap=random'
    if choice == 2:
        # All-allocated flag with an incomplete bitmap, or the reverse
        set_field(buf, 'autoclear_features',
                  get_field(buf, 'autoclear_features') ^ 1)
        return 'autoclear^1'
    buf[end - 1] = 0xff      # padding bits past the last cluster
    return 'bitmap_padding'


def mut_truncate(rng, buf, seed):
    choice = rng.randrange(3)
    if choice == 0:
        # Applied by mutate() after the other mutations
        n = rng.choice([0, 1, 64, 127, 128, 511, 512, 1024, 16383, 16384,
                        len(buf) - 1, len(buf) - 512])
        seed.truncate_to = max(0, n)
        return f'truncate={n}'
    if choice == 1:
        buf.extend(b'\0' * rng.choice([1, 511, 512, 65536]))
        return 'extend'
    # Reserved/garbage bytes in the fixed header
    off = rng.choice([12, 112, 120, 127])
    buf[off] = rng.randrange(1, 256)
    return f'reserved[{off}]'


def mut_bytes(rng, buf, seed):
    n = rng.randrange(1, 9)
    done = []
    for _ in range(n):
        limit = min(len(buf), rng.choice([128, 512, 4096, len(buf)]))
        if limit == 0:
            break
        pos = rng.randrange(limit)
        buf[pos] = rng.randrange(256)
        done.append(pos)
    return f'bytes{done}'


MUTATORS = [(mut_field, 5), (mut_geometry, 2), (mut_format, 2),
            (mut_name, 3), (mut_bitmap, 2), (mut_truncate, 1),
            (mut_bytes, 3)]


def mutate(rng, seed):
    buf = bytearray(seed.data)
    ops = []
    funcs = [m for m, w in MUTATORS for _ in range(w)]
    seed.truncate_to = None
    for _ in range(rng.choice([1, 1, 1, 2, 2, 3])):
        ops.append(rng.choice(funcs)(rng, buf, seed))
    if seed.truncate_to is not None:
        del buf[seed.truncate_to:]
    return bytes(buf), ops


def regressions(seeds):
    """Hand-made malformed images that once broke the driver"""
    out = []
    for seed in seeds[:2]:
        # The image file is the .add-cow file itself, opened as add-cow:
        # each open opened it again, without end (unbounded recursion)
        for fmt in (b'add-cow', b'raw'):
            buf = bytearray(seed.data)
            name = b'case.add-cow'
            buf[2048:2048 + len(name)] = name
            set_field(buf, 'image_name_offset', 2048)
            set_field(buf, 'image_name_size', len(name))
            buf[IMAGE_FORMAT_OFF:IMAGE_FORMAT_OFF + FMT_SIZE] = \
                fmt.ljust(FMT_SIZE, b'\0')
            out.append((seed, bytes(buf), [f'image file = itself as {fmt!r}']))
    return out


# ---- execution -------------------------------------------------------

class Runner:
    def __init__(self, qemu_img, qemu_io, timeout):
        self.qemu_img = qemu_img
        self.qemu_io = qemu_io
        self.timeout = timeout
        self.execs = 0
        self.autoclear_notes = 0
        self.slow = []          # (seconds, command) of slow executions
        self.slow_limit = timeout / 4
        env = dict(os.environ)
        # Own sanitizer settings, whatever the caller (e.g. the iotests
        # runner, which logs ASan output to a file) set: every report must
        # abort the process and reach its stderr, where it is looked for.
        env['ASAN_OPTIONS'] = ('detect_leaks=1:abort_on_error=1:'
                               'max_allocation_size_mb=2048:'
                               'allocator_may_return_null=0')
        env['UBSAN_OPTIONS'] = ('print_stacktrace=1:halt_on_error=1:'
                                'abort_on_error=1')
        env['MALLOC_PERTURB_'] = '165'
        self.env = env

    def exec(self, cmd):
        self.execs += 1
        t0 = time.monotonic()
        for attempt in range(10):
            try:
                p = subprocess.run(cmd, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, env=self.env,
                                   timeout=self.timeout, check=False,
                                   start_new_session=True)
                break
            except subprocess.TimeoutExpired as e:
                return None, e.stdout or b'', e.stderr or b''
            except OSError:
                # The binary is being relinked by a concurrent build
                if attempt == 9:
                    raise
                time.sleep(3)
        t = time.monotonic() - t0
        if t > self.slow_limit:
            self.slow.append((t, cmd[1] if cmd[0] == self.qemu_img
                              else 'qemu-io'))
        return p.returncode, p.stdout, p.stderr

    def check_one(self, name, cmd, rc, out, err, may_fail):
        """Return a failure description or None"""
        if rc is None:
            return f'{name}: hang (no exit within {self.timeout} s)'
        if rc < 0:
            return f'{name}: killed by signal {signal.Signals(-rc).name}'
        for m in SANITIZER_MARKERS:
            if m in err or m in out:
                return f'{name}: sanitizer/assertion report: ' + \
                    (err or out).decode(errors='replace')[-2000:]
        if rc != 0 and not may_fail(rc):
            return f'{name}: unexpected exit code {rc}'
        if rc != 0 and not (err.strip() or out.strip()):
            return f'{name}: failed (exit {rc}) without an error message'
        return None

    @staticmethod
    def only_autoclear_cleared(path, before):
        with open(path, 'rb') as f:
            after = f.read()
        if len(after) != len(before) or len(after) < 40:
            return False
        if after[:32] != before[:32] or after[40:] != before[40:]:
            return False
        old = struct.unpack_from('<Q', before, 32)[0]
        new = struct.unpack_from('<Q', after, 32)[0]
        return new == old & 1

    def run_case(self, path, protected, read_len):
        """Run the commands on @path; return a list of failure strings"""
        fails = []
        h0 = sha256(path)
        with open(path, 'rb') as f:
            before = f.read()
        prot = {p: sha256(p) for p in protected}

        cmd = [self.qemu_img, 'info', '-f', 'add-cow', path]
        rc, out, err = self.exec(cmd)
        f = self.check_one('info', cmd, rc, out, err, lambda r: r == 1)
        if f:
            fails.append(f)
        if sha256(path) != h0:
            fails.append('info modified the .add-cow file')

        cmd = [self.qemu_img, 'check', '-f', 'add-cow', path]
        rc, out, err = self.exec(cmd)
        # 0 clean, 1 check not completed, 2 corruptions, 3 leaks
        f = self.check_one('check', cmd, rc, out, err,
                           lambda r: r in (1, 2, 3))
        if f:
            fails.append(f)
        if sha256(path) != h0:
            fails.append('check (without -r) modified the .add-cow file')

        cmd = [self.qemu_io, '-f', 'add-cow',
               '-c', f'read 0 {read_len}', '-c', 'map', path]
        rc, out, err = self.exec(cmd)
        f = self.check_one('qemu-io', cmd, rc, out, err, lambda r: r == 1)
        if f:
            fails.append(f)
        opened = not (b"can't open" in err or b'Could not open' in err)
        if not opened and sha256(path) != h0:
            if self.only_autoclear_cleared(path, before):
                # Like qcow2: the driver clears unknown autoclear bits
                # before the generic block layer opens the backing file.
                self.autoclear_notes += 1
            else:
                fails.append('a failed read-write open modified the '
                             '.add-cow file')

        for p, h in prot.items():
            if sha256(p) != h:
                fails.append(f'{os.path.basename(p)} was modified')
        return fails


def restore(seed):
    """Recreate the seed's protected files (after a reported failure)"""
    for p in seed.protected:
        if os.path.basename(p) == 'base.raw':
            with open(p, 'wb') as f:
                f.write(bytes([0x42]) * seed.size)


def fuzz(args, log=print):
    os.makedirs(args.dir, exist_ok=True)
    seeds = make_seeds(args.qemu_img, args.qemu_io, args.dir)
    runner = Runner(args.qemu_img, args.qemu_io, args.timeout)
    rng = random.Random(args.seed)
    start = time.monotonic()
    failures = []
    cases = 0
    opened = 0
    fixed = regressions(seeds) if args.worker == 0 else []
    while cases < args.cases:
        if args.duration and time.monotonic() - start > args.duration:
            break
        if fixed:
            seed, data, ops = fixed.pop(0)
        else:
            seed = seeds[rng.randrange(len(seeds))]
            data, ops = mutate(rng, seed)
        cases += 1
        if args.start and cases < args.start:
            continue
        path = os.path.join(seed.dir, 'case.add-cow')
        with open(path, 'wb') as f:
            f.write(data)
        nslow = len(runner.slow)
        fails = runner.run_case(path, seed.protected, seed.size)
        if len(runner.slow) > nslow and args.verbose:
            log(f'slow case {cases}: {runner.slow[nslow:]} {ops}')
        if fails:
            cs = 1 << seed.cluster_bits
            desc = (f'case {cases} (seed {args.seed}, cluster size {cs}, '
                    f'{"backing" if seed.backing else "no backing"}): '
                    f'{", ".join(ops)}')
            failures.append(desc)
            keep = os.path.join(args.dir, f'fail-{args.seed}-{cases}.add-cow')
            with open(keep, 'wb') as f:
                f.write(data)
            log(f'FAIL {desc}')
            for f in fails:
                log(f'    {f}')
            log(f'    reproducer: {keep} (in {seed.dir})')
            restore(seed)
        if args.progress and cases % args.progress == 0:
            el = time.monotonic() - start
            log(f'progress: {cases} cases, {runner.execs} execs, '
                f'{runner.execs / el:.1f} execs/s, '
                f'{len(failures)} failures')
        os.unlink(path)
    elapsed = time.monotonic() - start
    return cases, runner, elapsed, failures


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument('--qemu-img', required=True)
    ap.add_argument('--qemu-io', required=True)
    ap.add_argument('--dir', required=True, help='work directory')
    ap.add_argument('--seed', type=int, default=1)
    ap.add_argument('--cases', type=int, default=300)
    ap.add_argument('--start', type=int, default=0,
                    help='skip (but still generate) cases before this one')
    ap.add_argument('--duration', type=float, default=0,
                    help='stop after this many seconds')
    ap.add_argument('--timeout', type=float, default=20)
    ap.add_argument('--jobs', type=int, default=1,
                    help='parallel workers (seeds SEED, SEED+1, ...)')
    ap.add_argument('--progress', type=int, default=0)
    ap.add_argument('--verbose', action='store_true')
    ap.add_argument('--worker', type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.jobs > 1:
        procs = []
        for j in range(args.jobs):
            cmd = [sys.executable, __file__] + \
                (['--verbose'] if args.verbose else []) + [
                   '--qemu-img', args.qemu_img, '--qemu-io', args.qemu_io,
                   '--dir', os.path.join(args.dir, f'w{j}'),
                   '--seed', str(args.seed + j), '--cases', str(args.cases),
                   '--duration', str(args.duration),
                   '--timeout', str(args.timeout),
                   '--progress', str(args.progress), '--worker', str(j)]
            procs.append(subprocess.Popen(cmd))
        rc = 0
        for p in procs:
            rc |= p.wait()
        return rc

    cases, runner, elapsed, failures = fuzz(args)
    execs = runner.execs
    print(f'seed {args.seed}: {cases} cases, {execs} executions in '
          f'{elapsed:.0f} s ({execs / max(elapsed, 1e-9):.1f} execs/s), '
          f'{len(failures)} failures, {len(runner.slow)} slow executions '
          f'(> {runner.slow_limit:.1f} s), {runner.autoclear_notes} failed '
          f'opens that cleared unknown autoclear bits')
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main())
