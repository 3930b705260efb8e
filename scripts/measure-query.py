#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
#
# How long query-named-block-nodes takes on a large add-cow image, and
# whether it reads the bitmap.  Creates a 256 GiB image with 512-byte
# clusters (a 64 MiB bitmap) in a scratch directory, opens it in
# qemu-storage-daemon and runs the query 20 times: once under strace,
# counting the pread/preadv calls made while the queries run (bitmap
# I/O would show there; the daemon's threads do block I/O with preadv
# under aio=threads), and once without strace, timing each query.
#
# Usage: measure-query.py [BUILD_DIR]   (default .build/build)

import os
import subprocess
import sys
import tempfile
import time

top = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# QEMU's own QMP client, from the source tree the build uses
sys.path.append(os.path.join(top, '.build', 'qemu', 'python'))
from qemu.qmp.legacy import QEMUMonitorProtocol  # noqa: E402
build = sys.argv[1] if len(sys.argv) > 1 else os.path.join(top, '.build',
                                                           'build')
qemu_img = os.path.join(build, 'qemu-img')
qsd = os.path.join(build, 'storage-daemon', 'qemu-storage-daemon')
N = 20


def run(tmp, traced):
    sock = os.path.join(tmp, 'qmp.sock')
    img = os.path.join(tmp, 'big.add-cow')
    cmd = [qsd, '--blockdev',
           f'driver=add-cow,node-name=big,file.driver=file,'
           f'file.filename={img},file.aio=threads,'
           f'image-file.driver=file,image-file.filename={img}.img,'
           f'image-file.aio=threads',
           '--chardev', f'socket,id=m,path={sock}',
           '--monitor', 'm']
    trace = os.path.join(tmp, 'strace.log')
    if traced:
        cmd = ['strace', '-f', '-ttt', '-e', 'trace=pread64,preadv,preadv2',
               '-o', trace] + cmd
    mon = QEMUMonitorProtocol(sock, server=True)
    p = subprocess.Popen(cmd)
    mon.accept(timeout=30)
    t0 = time.time()
    times = []
    for _ in range(N):
        t = time.perf_counter()
        mon.cmd('query-named-block-nodes')
        times.append((time.perf_counter() - t) * 1000)
    t1 = time.time()
    mon.cmd('quit')
    mon.close()
    p.wait()
    reads = None
    if traced:
        # [before the queries (the open), during them]
        reads = [0, 0]
        with open(trace) as fd:
            for line in fd:
                parts = line.split()
                if len(parts) > 2 and parts[2].startswith('pread'):
                    if float(parts[1]) < t0:
                        reads[0] += 1
                    elif float(parts[1]) <= t1:
                        reads[1] += 1
    return sorted(times), reads


with tempfile.TemporaryDirectory() as tmp:
    subprocess.run([qemu_img, 'create', '-q', '-f', 'add-cow', '-o',
                    'cluster_size=512', os.path.join(tmp, 'big.add-cow'),
                    '256G'], check=True)
    _, reads = run(tmp, True)
    times, _ = run(tmp, False)
    print(f'256 GiB, 512-byte clusters: {N} x query-named-block-nodes: '
          f'min {times[0]:.2f} ms, median {times[N // 2]:.2f} ms, '
          f'max {times[-1]:.2f} ms; pread/preadv calls: {reads[0]} while '
          f'opening, {reads[1]} during the queries')
