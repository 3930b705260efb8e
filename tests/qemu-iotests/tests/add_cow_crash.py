# Crash-state checker for add-cow (and other two-file image formats)
#
# Copyright (c) 2026 The add-cow authors
#
# SPDX-License-Identifier: GPL-2.0-or-later
#
# How it works
# ============
#
# 1. Recording.  A small NBD server (RecordingNBDServer, threads, fixed
#    newstyle handshake, simple replies only) listens on a UNIX socket and
#    exports every file of the image -- the .add-cow file ("meta"), the image
#    file ("image") and, for workloads that write it, the backing file
#    ("base") -- under separate export names.  QEMU opens the image with
#    every child on NBD, so every write, write-zeroes, trim and flush that
#    reaches any of the files is appended to ONE global log, in the order the
#    server received it.  An entry is logged before its reply is sent, so the
#    log order respects every ordering QEMU can observe (a request issued
#    after another one's completion is always logged after it).  A flush of
#    one export only makes that export's earlier writes durable.  FUA is not
#    advertised (QEMU then emulates it with a flush), nor is multi-conn.
#    The minimum block size is advertised as 512, so all requests are
#    sector-aligned.
#
# 2. The workload.  qemu-io runs interactively on a pipe; the checker sends
#    one command at a time and waits for the next prompt.  Before sending a
#    command it records the log position ("issued at"); when the prompt is
#    back the command has completed ("acknowledged at").  qemu-io's aio_write
#    returns at once: such a write counts as acknowledged only when the
#    following aio_flush (which drains all requests) has returned.  A guest
#    flush ('flush', or the implicit flush of a writethrough write, or the
#    close at the end of a session or of a qemu-img command) that completed
#    at position P makes durable every guest write acknowledged before the
#    flush was issued.  The recorder never has to tell the driver's internal
#    flushes from the guest's: guest flush points come from the workload.
#
# 3. Crash states.  For every position k of the log (0..N), each file holds
#    all its writes up to its last flush before k plus any subset of its
#    later writes before k, per 512-byte sector (a sector is atomic; if two
#    pending writes hit the same sector, any one of them or none may be the
#    surviving value).  The states of a point are enumerated exhaustively
#    when there are at most 2**exhaustive_bits of them, otherwise a
#    structured set (nothing, everything, each sector alone left out, each
#    sector alone written) plus a seeded random sample is checked.  States
#    are deduplicated by a hash of the file contents; the QEMU-side checks
#    of a state are done once, the content oracle once per (point, state).
#
# 4. Oracle.  A crash state is written to a directory with the file names
#    the image refers to and must pass:
#    - `qemu-img check` exits 0 (clean) or 3 (leaks only);
#    - `qemu-img convert -O raw` succeeds; every guest sector holds either
#      its value as of the durable writes at k (backing data / initial data
#      if none), or the value of a guest write issued before k that was not
#      yet durable -- never anything else (zeros, stale image-file data or
#      garbage); in particular every write acknowledged before a completed
#      guest flush is present.  Discards and zero writes may also read as
#      zeros or as the backing data.

import hashlib
import itertools
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Tuple

SECTOR = 512

# ---------------------------------------------------------------------------
# NBD protocol constants (newstyle, simple replies)

NBDMAGIC = 0x4e42444d41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC_OPT = 0x3e889045565a9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_INFO = 6
OPT_GO = 7

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_UNKNOWN = (1 << 31) + 6

INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3

TFLAG_HAS_FLAGS = 1 << 0
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_TRIM = 1 << 5
TFLAG_SEND_WRITE_ZEROES = 1 << 6

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_WRITE_ZEROES = 6

EIO = 5
EINVAL = 22
ENOSPC = 28

TFLAGS = (TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_TRIM |
          TFLAG_SEND_WRITE_ZEROES)


class LogEntry:
    """One write (sector-aligned, full sectors) or flush in the global log"""
    __slots__ = ('seq', 'kind', 'export', 'offset', 'data', 'op')

    def __init__(self, seq: int, kind: str, export: str, offset: int = 0,
                 data: bytes = b'', op: str = ''):
        self.seq = seq
        self.kind = kind        # 'W' or 'F'
        self.export = export
        self.offset = offset
        self.data = data        # sector contents after the request
        self.op = op            # 'write', 'zero', 'trim', 'flush'

    def __repr__(self) -> str:
        if self.kind == 'F':
            return f'#{self.seq} FLUSH {self.export}'
        return (f'#{self.seq} {self.op.upper()} {self.export} '
                f'{self.offset}+{len(self.data)}')


class RecordingNBDServer:
    """NBD server exporting several files, logging writes in one order"""

    def __init__(self, sock_path: str, exports: Dict[str, str],
                 sizes: Optional[Dict[str, int]] = None):
        self.sock_path = sock_path
        self.exports = dict(exports)
        # Advertised sizes: a file may grow up to it (formats like qcow2
        # grow their files; NBD cannot resize), by default its real size
        self.sizes = dict(sizes or {})
        self.lock = threading.Lock()
        self.log: List[LogEntry] = []
        self.errors: List[str] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            os.unlink(sock_path)
        except FileNotFoundError:
            pass
        self.sock.bind(sock_path)
        self.sock.listen(16)
        self.closing = False
        self.threads: List[threading.Thread] = []
        self.conns: List[socket.socket] = []
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def position(self) -> int:
        with self.lock:
            return len(self.log)

    def close(self) -> None:
        self.closing = True
        try:
            self.sock.close()
        except OSError:
            pass
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self.threads:
            t.join(5)
        try:
            os.unlink(self.sock_path)
        except FileNotFoundError:
            pass

    def _accept(self) -> None:
        while not self.closing:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(t)
            t.start()

    @staticmethod
    def _recv(conn: socket.socket, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = conn.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return bytes(buf)

    def _opt_reply(self, conn: socket.socket, opt: int, rtype: int,
                   data: bytes = b'') -> None:
        conn.sendall(struct.pack('>QIII', REPLY_MAGIC_OPT, opt, rtype,
                                 len(data)) + data)

    def _serve(self, conn: socket.socket) -> None:
        try:
            name = self._handshake(conn)
            if name is not None:
                self._transmission(conn, name)
        except (EOFError, ConnectionError, OSError):
            pass
        except Exception as e:  # pylint: disable=broad-except
            self.errors.append(f'nbd server: {e!r}')
        finally:
            conn.close()

    def _handshake(self, conn: socket.socket) -> Optional[str]:
        conn.sendall(struct.pack('>QQH', NBDMAGIC, IHAVEOPT,
                                 FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        cflags, = struct.unpack('>I', self._recv(conn, 4))
        while True:
            magic, opt, length = struct.unpack('>QII', self._recv(conn, 16))
            if magic != IHAVEOPT:
                return None
            data = self._recv(conn, length) if length else b''
            if opt == OPT_EXPORT_NAME:
                name = data.decode()
                if name not in self.exports:
                    return None
                size = self._size(name)
                msg = struct.pack('>QH', size, TFLAGS)
                if not cflags & FLAG_C_NO_ZEROES:
                    msg += bytes(124)
                conn.sendall(msg)
                return name
            if opt in (OPT_INFO, OPT_GO):
                nlen, = struct.unpack('>I', data[:4])
                name = data[4:4 + nlen].decode()
                if name not in self.exports:
                    self._opt_reply(conn, opt, REP_ERR_UNKNOWN)
                    continue
                size = self._size(name)
                self._opt_reply(conn, opt, REP_INFO,
                                struct.pack('>HQH', INFO_EXPORT, size, TFLAGS))
                self._opt_reply(conn, opt, REP_INFO,
                                struct.pack('>HIII', INFO_BLOCK_SIZE, SECTOR,
                                            4096, 32 * 1024 * 1024))
                self._opt_reply(conn, opt, REP_ACK)
                if opt == OPT_GO:
                    return name
                continue
            if opt == OPT_ABORT:
                self._opt_reply(conn, opt, REP_ACK)
                return None
            if opt == OPT_LIST:
                for n in self.exports:
                    b = n.encode()
                    self._opt_reply(conn, opt, REP_SERVER,
                                    struct.pack('>I', len(b)) + b)
                self._opt_reply(conn, opt, REP_ACK)
                continue
            self._opt_reply(conn, opt, REP_ERR_UNSUP)

    def _size(self, name: str) -> int:
        return max(os.path.getsize(self.exports[name]),
                   self.sizes.get(name, 0))

    def _transmission(self, conn: socket.socket, name: str) -> None:
        path = self.exports[name]
        fd = os.open(path, os.O_RDWR)
        try:
            while True:
                magic, _flags, cmd, handle, offset, length = \
                    struct.unpack('>IHHQQI', self._recv(conn, 28))
                if magic != REQUEST_MAGIC:
                    return
                payload = b''
                err = 0
                if cmd == CMD_WRITE:
                    payload = self._recv(conn, length)
                if cmd == CMD_DISC:
                    return
                if cmd == CMD_READ:
                    data = os.pread(fd, length, offset)
                    data += bytes(length - len(data))
                    conn.sendall(struct.pack('>IIQ', SIMPLE_REPLY_MAGIC, 0,
                                             handle) + data)
                    continue
                if cmd in (CMD_WRITE, CMD_WRITE_ZEROES, CMD_TRIM):
                    size = self._size(name)
                    if offset + length > size:
                        err = ENOSPC
                    else:
                        if cmd != CMD_WRITE:
                            payload = bytes(length)
                        op = {CMD_WRITE: 'write', CMD_WRITE_ZEROES: 'zero',
                              CMD_TRIM: 'trim'}[cmd]
                        self._write(fd, name, offset, payload, op)
                elif cmd == CMD_FLUSH:
                    with self.lock:
                        self.log.append(LogEntry(len(self.log), 'F', name,
                                                 op='flush'))
                else:
                    err = EINVAL
                conn.sendall(struct.pack('>IIQ', SIMPLE_REPLY_MAGIC, err,
                                         handle))
        finally:
            os.close(fd)

    def _write(self, fd: int, name: str, offset: int, payload: bytes,
               op: str) -> None:
        with self.lock:
            os.pwrite(fd, payload, offset)
            # Log whole sectors as they are now: an unaligned request (the
            # block size advertised should prevent them) becomes the
            # sector-level update it amounts to.
            start = offset - offset % SECTOR
            end = -(-(offset + len(payload)) // SECTOR) * SECTOR
            data = os.pread(fd, end - start, start)
            data += bytes(end - start - len(data))
            self.log.append(LogEntry(len(self.log), 'W', name, start, data,
                                     op))


# ---------------------------------------------------------------------------
# Image formats under test

class Format:
    """How to create an image and open it with every file on NBD"""

    name = ''
    image_child = ''

    def __init__(self, cluster_size: int, size: int, extra_opts: str = ''):
        self.cluster_size = cluster_size
        self.size = size
        self.extra_opts = extra_opts

    meta_name = 't.img'
    data_name = 't.data'
    grow: Dict[str, int] = {}
    # Fill the image file's clusters that the workload writes with stale
    # data first, as a reused file would hold: a bit set before its data
    # then reads garbage even without a backing file
    stale_prefill = False

    def create(self, qemu_img: List[str], workdir: str,
               backing: Optional[str]) -> None:
        raise NotImplementedError

    def runtime_opts(self, sock: str, backing_export: bool,
                     backing_path: Optional[str]) -> dict:
        opts = {
            'driver': self.name,
            'file': {'driver': 'nbd', 'export': 'meta',
                     'server': {'type': 'unix', 'path': sock}},
        }
        if self.data_name:
            opts[self.image_child] = {'driver': 'nbd', 'export': 'image',
                                      'server': {'type': 'unix',
                                                 'path': sock}}
        if backing_path is not None and not backing_export:
            opts['backing'] = {'driver': 'raw',
                               'file': {'driver': 'file',
                                        'filename': backing_path}}
        return opts


class AddCowFormat(Format):
    name = 'add-cow'
    stale_prefill = True
    image_child = 'image-file'
    meta_name = 't.add-cow'
    data_name = 't.add-cow.img'

    def create(self, qemu_img, workdir, backing):
        args = qemu_img + ['create', '-q', '-f', 'add-cow']
        if backing:
            args += ['-u', '-b', backing, '-F', 'raw']
        args += ['-o', f'image_file={self.data_name},'
                 f'cluster_size={self.cluster_size}',
                 self.meta_name, str(self.size)]
        subprocess.run(args, cwd=workdir, check=True,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


class Qcow2DataFileFormat(Format):
    """qcow2 with a raw external data file: used to validate the checker"""
    name = 'qcow2'
    image_child = 'data-file'
    meta_name = 't.qcow2'
    data_name = 't.qcow2.data'
    grow = {'meta': 64 << 20, 'image': 64 << 20}

    def create(self, qemu_img, workdir, backing):
        args = qemu_img + ['create', '-q', '-f', 'qcow2']
        if backing:
            args += ['-u', '-b', backing, '-F', 'raw']
        args += ['-o', f'data_file={self.data_name},'
                 f'cluster_size={self.cluster_size}',
                 self.meta_name, str(self.size)]
        subprocess.run(args, cwd=workdir, check=True,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


class SingleFileFormat(Format):
    """qcow2 in one file: a control that must pass.  (qed would not do: it
    allocates at the end of its file, and an NBD export cannot grow.)"""
    data_name = ''
    grow = {'meta': 64 << 20}

    def create(self, qemu_img, workdir, backing):
        args = qemu_img + ['create', '-q', '-f', self.name]
        if backing:
            args += ['-u', '-b', backing, '-F', 'raw']
        args += ['-o', f'cluster_size={self.cluster_size}',
                 self.meta_name, str(self.size)]
        subprocess.run(args, cwd=workdir, check=True,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


class Qcow2Format(SingleFileFormat):
    name = 'qcow2'
    meta_name = 't.qcow2'


FORMATS = {'add-cow': AddCowFormat, 'qcow2-datafile': Qcow2DataFileFormat,
           'qcow2': Qcow2Format}


# ---------------------------------------------------------------------------
# Workloads

class GuestOp:
    """A guest-visible operation of the workload and where it sits in the log"""

    def __init__(self, kind: str, offset: int = 0, length: int = 0,
                 pattern: int = 0):
        self.kind = kind          # write, zero, discard, flush
        self.offset = offset
        self.length = length
        self.pattern = pattern
        self.issue = -1           # log position when issued
        self.ack = -1             # log position when known complete
        self.writethrough = False


class Step:
    """A qemu-io session or a qemu-img command within a workload"""

    def __init__(self, kind: str, cmds: Optional[List[str]] = None,
                 args: Optional[List[str]] = None, cache: str = 'writeback',
                 opts: Optional[dict] = None):
        self.kind = kind          # 'io' or 'img'
        self.cmds = cmds or []
        self.args = args or []
        self.cache = cache
        self.opts = opts or {}


class Workload:
    def __init__(self, name: str, fmt: Format, steps: List[Step],
                 backing: bool = True, base_on_nbd: bool = False,
                 mutant: Optional[str] = None,
                 expect_violation: bool = False,
                 state_budget: Optional[int] = None,
                 new_backing: bool = False,
                 grow: Optional[Dict[str, int]] = None):
        self.name = name
        # Exports advertised larger than their file, so that they can grow
        self.grow = grow
        self.new_backing = new_backing
        self.state_budget = state_budget
        self.fmt = fmt
        self.steps = steps
        self.backing = backing
        self.base_on_nbd = base_on_nbd
        # Run the workload with this mutant's qemu-io and qemu-img
        self.mutant = mutant
        self.expect_violation = expect_violation

    def max_states(self, default: int) -> int:
        if self.state_budget is None:
            return default
        return min(default, self.state_budget)

    def touched_clusters(self) -> List[int]:
        c = self.fmt.cluster_size
        out = set()
        for step in self.steps:
            for cmd in step.cmds:
                op = parse_guest_cmd(cmd)
                if op and op.kind != 'flush':
                    out.update(range(op.offset // c,
                                     -(-(op.offset + op.length) // c)))
        return sorted(out)


def parse_guest_cmd(cmd: str) -> Optional[GuestOp]:
    """The guest write a qemu-io command line performs, if any"""
    words = cmd.split()
    name = words[0]
    if name in ('flush', 'f'):
        return GuestOp('flush')
    if name not in ('write', 'aio_write', 'discard', 'w'):
        return None
    pattern = 0xcd
    zero = False
    i = 1
    pos: List[str] = []
    while i < len(words):
        if words[i] == '-P':
            pattern = int(words[i + 1], 0)
            i += 2
            continue
        if words[i] == '-z':
            zero = True
        elif not words[i].startswith('-'):
            pos.append(words[i])
        i += 1
    off, length = (parse_size(p) for p in pos[:2])
    if name == 'discard':
        return GuestOp('discard', off, length)
    if zero:
        return GuestOp('zero', off, length)
    return GuestOp('write', off, length, pattern)


def parse_size(s: str) -> int:
    mult = {'k': 1 << 10, 'm': 1 << 20, 'g': 1 << 30}
    s = s.lower()
    if s[-1] in mult:
        return int(s[:-1], 0) * mult[s[-1]]
    return int(s, 0)


# ---------------------------------------------------------------------------
# Running a workload

class QemuIO:
    """qemu-io driven command by command over a pipe"""

    PROMPT = b'qemu-io> '

    def __init__(self, args: List[str]):
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self.out = bytearray()
        self.cond = threading.Condition()
        self.eof = False
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.prompts = 0
        self._wait_prompts(1)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while True:
            chunk = self.proc.stdout.read1(65536)
            with self.cond:
                if not chunk:
                    self.eof = True
                    self.cond.notify_all()
                    return
                self.out += chunk
                self.cond.notify_all()

    def _wait_prompts(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.out.count(self.PROMPT) < n:
                if self.eof:
                    raise RuntimeError('qemu-io exited: ' +
                                       self.out.decode(errors='replace'))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError('qemu-io timed out: ' +
                                       self.out.decode(errors='replace'))
                self.cond.wait(left)
        self.prompts = n

    def command(self, cmd: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd.encode() + b'\n')
        self.proc.stdin.flush()
        self._wait_prompts(self.prompts + 1)

    def quit(self) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b'quit\n')
        self.proc.stdin.close()
        self.proc.wait(60)
        self.reader.join(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return self.out.decode(errors='replace')


class Checker:
    def __init__(self, workdir: str, qemu_img: List[str], qemu_io: List[str],
                 exhaustive_bits: int = 8, samples: int = 24,
                 max_states: int = 400, seed: int = 1, jobs: int = 0,
                 verbose: bool = False, sock_dir: str = '',
                 mutants_dir: str = ''):
        self.workdir = workdir
        self.mutants_dir = mutants_dir
        self.sock_dir = sock_dir or workdir
        self.qemu_img = qemu_img
        self.qemu_io = qemu_io
        self.exhaustive_bits = exhaustive_bits
        self.samples = samples
        self.max_states = max_states
        self.seed = seed
        self.jobs = jobs or (os.cpu_count() or 1) + 1
        self.verbose = verbose

    # -- workload execution --------------------------------------------

    def tools(self, wl: Workload) -> Tuple[List[str], List[str]]:
        """qemu-img and qemu-io that run the steps of @wl"""
        if not wl.mutant:
            return self.qemu_img, self.qemu_io
        d = os.path.join(self.mutants_dir, wl.mutant, 'bin')
        img = os.path.join(d, 'qemu-img')
        qio = os.path.join(d, 'qemu-io')
        if not (os.access(img, os.X_OK) and os.access(qio, os.X_OK)):
            raise RuntimeError(f'mutant {wl.mutant} is not built in '
                               f'{self.mutants_dir or "(no directory)"}; '
                               f'see scripts/build-mutant.sh')
        return [img], [qio]

    def run_workload(self, wl: Workload) -> 'Result':
        wdir = os.path.join(self.workdir, 'wl')
        shutil.rmtree(wdir, ignore_errors=True)
        os.makedirs(wdir)
        fmt = wl.fmt
        size = fmt.size
        backing_path = None
        if wl.backing:
            backing_path = os.path.join(wdir, 'base.raw')
            with open(backing_path, 'wb') as f:
                f.write(backing_pattern(size))
        # With the backing file on NBD, the header names it by an NBD URI:
        # QEMU cannot resolve a relative name against an NBD node, nor
        # combine NBD server options with the header's file name.  The
        # crash states then override the backing file explicitly.
        sock = os.path.join(self.sock_dir, f'acc-{os.getpid()}.sock')
        bname = None
        if wl.backing:
            bname = 'base.raw'
            if wl.base_on_nbd:
                bname = f'nbd+unix:///base?socket={sock}'
        fmt.create(self.qemu_img, wdir, bname)
        if wl.new_backing:
            # differs from base.raw in every other sector
            new = bytearray(backing_pattern(size))
            for off in range(0, size, 2 * SECTOR):
                new[off:off + 4] = b'NEWB'
            with open(os.path.join(wdir, 'new.raw'), 'wb') as f:
                f.write(new)

        if fmt.stale_prefill:
            path = os.path.join(wdir, fmt.data_name)
            fsize = os.path.getsize(path)
            c = fmt.cluster_size
            with open(path, 'r+b') as f:
                for cl in wl.touched_clusters():
                    if (cl + 1) * c <= fsize:
                        f.seek(cl * c)
                        f.write(STALE * (c // SECTOR))
        files = {'meta': os.path.join(wdir, fmt.meta_name)}
        if fmt.data_name:
            files['image'] = os.path.join(wdir, fmt.data_name)
        if wl.backing and wl.base_on_nbd:
            files['base'] = backing_path
        initial_files = {e: read_file(p) for e, p in files.items()}
        initial_guest = self.guest_content_of(wdir, fmt, wl.base_on_nbd)

        server = RecordingNBDServer(sock, files,
                                    wl.grow if wl.grow is not None
                                    else fmt.grow)
        ops: List[GuestOp] = []
        try:
            for step in wl.steps:
                self._run_step(server, wl, step, sock, backing_path, ops)
        finally:
            server.close()
        if server.errors:
            raise RuntimeError('; '.join(server.errors))
        final_guest = self.guest_content_of(wdir, fmt, wl.base_on_nbd)

        res = Result(wl)
        res.log = server.log
        res.ops = ops
        self._check_states(wl, res, initial_files, initial_guest,
                           backing_path, final_guest)
        return res

    def _run_step(self, server: RecordingNBDServer, wl: Workload, step: Step,
                  sock: str, backing_path: Optional[str],
                  ops: List[GuestOp]) -> None:
        qemu_img, qemu_io = self.tools(wl)
        opts = wl.fmt.runtime_opts(sock, wl.base_on_nbd, backing_path)
        opts.update(step.opts)
        filename = 'json:' + json.dumps(opts)
        if step.kind == 'img':
            start = server.position()
            wdir = os.path.dirname(backing_path or self.workdir)
            args = [a.replace('@IMG@', filename).replace('@WDIR@', wdir)
                    for a in step.args]
            p = subprocess.run(qemu_img + args, cwd=os.path.dirname(
                backing_path or self.workdir), stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, check=False)
            if p.returncode != 0:
                raise RuntimeError(f'qemu-img {" ".join(args)} failed: ' +
                                   p.stdout.decode(errors='replace'))
            done = server.position()
            if args[0] == 'resize':
                # the guest disk takes the new size; what lies past a
                # shrunk end reads zeros when the disk grows again
                rs = GuestOp('resize', parse_size(args[-1]))
                rs.issue, rs.ack = start, done
                ops.append(rs)
            # qemu-img flushed the image when it closed it, before exiting
            op = GuestOp('flush')
            op.issue = op.ack = done
            ops.append(op)
            return

        args = qemu_io + ['-t', step.cache, filename]
        qio = QemuIO(args)
        writethrough = step.cache in ('writethrough', 'directsync')
        pending_aio: List[GuestOp] = []
        for cmd in step.cmds:
            op = parse_guest_cmd(cmd)
            pos = server.position()
            qio.command(cmd)
            done = server.position()
            if cmd.split()[0] == 'aio_flush':
                for a in pending_aio:
                    a.ack = done
                pending_aio.clear()
            if op is None:
                continue
            op.issue = pos
            op.writethrough = writethrough and op.kind != 'flush'
            if cmd.startswith('aio_'):
                pending_aio.append(op)
            else:
                op.ack = done
            ops.append(op)
        pos = server.position()
        out = qio.quit()
        done = server.position()
        for a in pending_aio:
            a.ack = done
        # Closing the image flushes it
        close = GuestOp('flush')
        close.issue = pos
        close.ack = done
        ops.append(close)
        bad = [l for l in out.splitlines()
               if 'fail' in l.lower() or 'error' in l.lower()]
        if bad or qio.proc.returncode != 0:
            raise RuntimeError(f'workload {wl.name}: qemu-io: ' +
                               '\n'.join(bad or [out]))

    # -- QEMU-side checks of one state ---------------------------------

    @staticmethod
    def _image_args(fmt: Format, override_backing: bool) -> List[str]:
        """qemu-img arguments naming the image in the current directory"""
        if not override_backing:
            return ['-f', fmt.name, fmt.meta_name]
        return ['json:' + json.dumps({
            'driver': fmt.name,
            'file': {'driver': 'file', 'filename': fmt.meta_name},
            'backing': {'driver': 'raw',
                        'file': {'driver': 'file', 'filename': 'base.raw'}}})]

    def guest_content_of(self, wdir: str, fmt: Format,
                         override_backing: bool = False) -> bytes:
        subprocess.run(self.qemu_img + ['convert', '-O', 'raw'] +
                       self._image_args(fmt, override_backing) +
                       ['guest.raw'],
                       check=True, cwd=wdir, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT)
        out = os.path.join(wdir, 'guest.raw')
        data = read_file(out)
        os.unlink(out)
        return data

    def _qemu_check_state(self, sdir: str, fmt: Format,
                          override_backing: bool = False) \
            -> Tuple[Optional[str], Optional[bytes]]:
        """Returns (problem, guest content)"""
        # Relative names, run in the state's directory: qcow2 resolves a
        # relative data file name against the working directory
        img = self._image_args(fmt, override_backing)
        p = subprocess.run(self.qemu_img + ['check'] + img,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           check=False, cwd=sdir)
        if p.returncode not in (0, 3):
            lines = p.stdout.decode(errors='replace').strip().splitlines()
            errs = [ln for ln in lines if 'ERROR' in ln] or lines[:1]
            return (f'qemu-img check exit {p.returncode}: ' +
                    '; '.join(errs[:3]), None)
        p = subprocess.run(self.qemu_img + ['convert', '-O', 'raw'] + img +
                           ['guest.raw'],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           check=False, cwd=sdir)
        if p.returncode != 0:
            return ('qemu-img convert failed: ' +
                    p.stdout.decode(errors='replace').strip(), None)
        return None, read_file(os.path.join(sdir, 'guest.raw'))

    # -- crash-state enumeration and oracle ----------------------------

    def _check_states(self, wl: Workload, res: 'Result',
                      initial_files: Dict[str, bytes], initial_guest: bytes,
                      backing_path: Optional[str], final_guest: bytes) -> None:
        fmt = wl.fmt
        log = res.log
        rng = random.Random(f'{self.seed}:{wl.name}')
        backing = read_file(backing_path) if backing_path else b''
        model = GuestModel(res.ops, initial_guest, backing, fmt.size)

        # The final state (no crash) must read exactly what was written
        problem = model.check(len(log), final_guest)
        if problem:
            res.violations.append((len(log), 'final state (no crash)',
                                   problem))

        # A state is an overlay of sectors over the initial files:
        # {(export, sector): contents}; only sectors that differ from the
        # initial file are kept, so equal states have equal overlays.
        space = StateSpace(initial_files)
        durable: Dict[Tuple[str, int], bytes] = {}
        pending: Dict[str, List[LogEntry]] = {e: [] for e in initial_files}
        seen_states: Dict[bytes, Dict[Tuple[str, int], bytes]] = {}
        per_point: List[Tuple[int, List[bytes]]] = []
        durables: List[Dict[Tuple[str, int], bytes]] = []
        for k in range(len(log) + 1):
            if k > 0:
                e = log[k - 1]
                if e.kind == 'F':
                    for w in pending[e.export]:
                        space.apply(durable, e.export, w.offset, w.data)
                    pending[e.export] = []
                else:
                    pending[e.export].append(e)
            keys = []
            for st in self._states_at(space, durable, pending, rng):
                key = space.key(st)
                if key not in seen_states:
                    seen_states[key] = st
                keys.append(key)
            per_point.append((k, keys))
            durables.append(dict(durable))

        # Budget: keep at most max_states distinct states, taking the
        # states of all points round-robin (structured ones come first).
        order: List[bytes] = []
        chosen = set()
        rounds = max(len(keys) for _, keys in per_point)
        for i in range(rounds):
            for _, keys in per_point:
                if len(chosen) >= wl.max_states(self.max_states):
                    break
                if i < len(keys) and keys[i] not in chosen:
                    chosen.add(keys[i])
                    order.append(keys[i])
        res.states_total = len(seen_states)

        sroot = os.path.join(self.workdir, 'states')
        shutil.rmtree(sroot, ignore_errors=True)
        os.makedirs(sroot)
        names = {'meta': fmt.meta_name, 'image': fmt.data_name,
                 'base': 'base.raw'}
        slots = [StateDir(os.path.join(sroot, str(i)), space, names,
                          None if 'base' in initial_files else backing_path)
                 for i in range(self.jobs)]
        free = list(slots)
        free_lock = threading.Lock()

        def check_one(key):
            with free_lock:
                slot = free.pop()
            try:
                slot.materialize(seen_states[key])
                return key, self._qemu_check_state(slot.path, fmt,
                                                   wl.base_on_nbd)
            finally:
                with free_lock:
                    free.append(slot)

        results: Dict[bytes, Tuple[Optional[str], Optional[bytes]]] = {}
        with ThreadPoolExecutor(self.jobs) as ex:
            for key, r in ex.map(check_one, order):
                results[key] = r

        checked_pairs = 0
        for k, keys in per_point:
            for key in keys:
                if key not in results:
                    continue
                checked_pairs += 1
                problem, guest = results[key]
                if problem is None:
                    problem = model.check(k, guest)
                if problem:
                    res.violations.append((k, describe_state(
                        seen_states[key], durables[k], log, k), problem))
        res.states = len(results)
        res.pairs = checked_pairs
        res.points = len(per_point)
        shutil.rmtree(sroot, ignore_errors=True)

    def _states_at(self, space: 'StateSpace',
                   durable: Dict[Tuple[str, int], bytes],
                   pending: Dict[str, List[LogEntry]],
                   rng: random.Random) -> List[Dict[Tuple[str, int], bytes]]:
        # Per (file, sector): the values its pending writes would leave
        choices: Dict[Tuple[str, int], List[bytes]] = {}
        for e, ws in pending.items():
            for w in ws:
                for i in range(0, len(w.data), SECTOR):
                    s = (w.offset + i) // SECTOR
                    v = w.data[i:i + SECTOR]
                    vals = choices.setdefault((e, s), [])
                    # a later write of the same value changes nothing
                    if v in vals:
                        vals.remove(v)
                    vals.append(v)
        # Drop values equal to the durable one (no visible difference)
        ch: List[Tuple[Tuple[str, int], List[bytes]]] = []
        for es, vals in choices.items():
            cur = durable.get(es)
            if cur is None:
                cur = space.initial_sector(*es)
            vals = [v for v in vals if v != cur]
            if vals:
                ch.append((es, vals))

        def build(sel) -> Dict[Tuple[str, int], bytes]:
            st = dict(durable)
            for (es, _), v in zip(ch, sel):
                if v is not None:
                    space.set(st, es, v)
            return st

        n_states = 1
        for _, vals in ch:
            n_states *= 1 + len(vals)
            if n_states > (1 << self.exhaustive_bits):
                break
        if n_states <= (1 << self.exhaustive_bits):
            return [build(sel) for sel in
                    itertools.product(*[[None] + vals for _, vals in ch])]

        latest = [vals[-1] for _, vals in ch]
        n = len(ch)
        # The request that last wrote each sector
        owner: Dict[Tuple[str, int], int] = {}
        for e, ws in pending.items():
            for w in ws:
                for i in range(0, len(w.data), SECTOR):
                    owner[(e, (w.offset + i) // SECTOR)] = w.seq
        reqs: Dict[int, List[int]] = {}
        for i, (es, _) in enumerate(ch):
            reqs.setdefault(owner[es], []).append(i)
        structured: List[list] = [[None] * n, latest]
        # each file alone
        for e in pending:
            structured.append([v if c[0][0] == e else None
                               for c, v in zip(ch, latest)])
        # everything but one request / nothing but one request
        for idxs in reqs.values():
            sel = list(latest)
            only: list = [None] * n
            for i in idxs:
                sel[i] = None
                only[i] = latest[i]
            structured += [sel, only]
        # everything but one sector / nothing but one sector, for a few
        # sectors (the first and last of each request, some random ones)
        picks = set()
        for idxs in reqs.values():
            picks.update((idxs[0], idxs[-1]))
        picks.update(rng.sample(range(n), min(n, self.samples)))
        for i in sorted(picks)[:4 * self.samples]:
            structured.append(latest[:i] + [None] + latest[i + 1:])
            structured.append([None] * i + [latest[i]] + [None] * (n - i - 1))
        randoms = []
        for _ in range(self.samples):
            sel = []
            p = rng.random()
            for _, vals in ch:
                sel.append(rng.choice(vals) if rng.random() < p else None)
            randoms.append(sel)
        # interleave so that a budget cut keeps both kinds
        mixed = structured[:2 + len(pending)]
        rest = structured[2 + len(pending):]
        while rest or randoms:
            if randoms:
                mixed.append(randoms.pop(0))
            if rest:
                mixed.append(rest.pop(0))
        return [build(sel) for sel in mixed]


class StateSpace:
    """Crash states as sector overlays over the initial files"""

    def __init__(self, initial: Dict[str, bytes]):
        self.initial = initial

    def initial_sector(self, export: str, s: int) -> bytes:
        v = self.initial[export][s * SECTOR:(s + 1) * SECTOR]
        return v + bytes(SECTOR - len(v))

    def set(self, st: Dict[Tuple[str, int], bytes], es: Tuple[str, int],
            v: bytes) -> None:
        if v == self.initial_sector(*es) and \
                es[1] * SECTOR < len(self.initial[es[0]]):
            st.pop(es, None)
        else:
            st[es] = v

    def apply(self, st: Dict[Tuple[str, int], bytes], export: str,
              offset: int, data: bytes) -> None:
        for i in range(0, len(data), SECTOR):
            self.set(st, (export, (offset + i) // SECTOR),
                     data[i:i + SECTOR])

    @staticmethod
    def key(st: Dict[Tuple[str, int], bytes]) -> bytes:
        h = hashlib.sha256()
        for (e, s) in sorted(st):
            h.update(f'{e}:{s}:'.encode())
            h.update(st[(e, s)])
        return h.digest()

    def size(self, st: Dict[Tuple[str, int], bytes], export: str) -> int:
        end = len(self.initial[export])
        for (e, s) in st:
            if e == export:
                end = max(end, (s + 1) * SECTOR)
        return end


class StateDir:
    """A directory holding one crash state at a time, updated in place"""

    def __init__(self, path: str, space: StateSpace, names: Dict[str, str],
                 backing_link: Optional[str]):
        self.path = path
        self.space = space
        self.names = names
        os.makedirs(path)
        for e, data in space.initial.items():
            with open(os.path.join(path, names[e]), 'wb') as f:
                write_sparse(f, data)
        if backing_link:
            os.symlink(backing_link, os.path.join(path, 'base.raw'))
        self.cur: Dict[Tuple[str, int], bytes] = {}

    def materialize(self, st: Dict[Tuple[str, int], bytes]) -> None:
        for e in self.space.initial:
            with open(os.path.join(self.path, self.names[e]), 'r+b') as f:
                fd = f.fileno()
                for es in set(self.cur) | set(st):
                    if es[0] != e:
                        continue
                    v = st.get(es)
                    if v is None:
                        v = self.space.initial_sector(*es)
                    if self.cur.get(es) != v:
                        os.pwrite(fd, v, es[1] * SECTOR)
                os.ftruncate(fd, self.space.size(st, e))
        self.cur = dict(st)


def write_sparse(f, data: bytes) -> None:
    chunk = 65536
    zero = bytes(chunk)
    mv = memoryview(data)
    for off in range(0, len(data), chunk):
        piece = mv[off:off + chunk]
        if piece != zero[:len(piece)]:
            f.seek(off)
            f.write(piece)
    f.truncate(len(data))


class GuestModel:
    """What the guest may read after a crash at each log position"""

    def __init__(self, ops: List[GuestOp], initial: bytes, backing: bytes,
                 size: int):
        self.ops = ops
        self.orig_size = size
        size = max([size] + [o.offset for o in ops if o.kind == 'resize'])
        self.size = size
        # Past the original end the disk reads zeros once grown
        self.initial = initial + bytes(size - len(initial))
        backing = backing[:size]
        self.backing = backing + bytes(size - len(backing))
        self.resizes = [o for o in ops if o.kind == 'resize']
        # A shrink acts as a zero write of everything past the new end
        for o in self.resizes:
            o.length = size - o.offset
        self.writes = [o for o in ops if o.kind != 'flush']
        self.flushes = [o for o in ops if o.kind == 'flush']
        touched = set()
        for w in self.writes:
            for s in range(w.offset // SECTOR,
                           -(-(w.offset + w.length) // SECTOR)):
                touched.add(s)
        self.touched = sorted(touched)
        self.cache: Dict[int, Dict[int, set]] = {}

    def sizes(self, k: int) -> set:
        dur = [w for w in self.durable_writes(k) if w.kind == 'resize']
        out = {dur[-1].offset if dur else self.orig_size}
        for w in self.resizes:
            if w.issue < k and w not in dur:
                out.add(w.offset)
        return out

    def _value(self, w: GuestOp, s: int) -> List[bytes]:
        if w.kind == 'write':
            return [bytes([w.pattern]) * SECTOR]
        if w.kind in ('zero', 'resize'):
            return [bytes(SECTOR)]
        # discard: zeros or the backing data (or unchanged)
        return [bytes(SECTOR), self.backing[s * SECTOR:(s + 1) * SECTOR]]

    def durable_writes(self, k: int) -> List[GuestOp]:
        barrier = -1
        for f in self.flushes:
            if f.ack <= k:
                barrier = max(barrier, f.issue)
        for w in self.writes:
            if w.writethrough and w.ack <= k:
                barrier = max(barrier, w.issue)
        out = []
        for w in self.writes:
            if w.ack <= barrier:
                out.append(w)
            elif w.writethrough and w.ack <= k:
                out.append(w)
        return out

    def allowed(self, k: int) -> Dict[int, set]:
        if k in self.cache:
            return self.cache[k]
        dur = self.durable_writes(k)
        dur_ids = {id(w) for w in dur}
        allowed: Dict[int, set] = {}
        for s in self.touched:
            lo, hi = s * SECTOR, (s + 1) * SECTOR
            cur = {self.initial[lo:hi]}
            prev: Optional[GuestOp] = None
            for w in dur:
                if not (w.offset < hi and w.offset + w.length > lo):
                    continue
                vals = self._value(w, s)
                if w.kind == 'discard':
                    cur |= set(vals)
                elif prev is not None and w.issue < prev.ack:
                    cur |= set(vals)     # overlapping in-flight requests
                else:
                    cur = set(vals)
                prev = w
            for w in self.writes:
                if id(w) in dur_ids or w.issue >= k:
                    continue
                if w.offset < hi and w.offset + w.length > lo:
                    cur |= set(self._value(w, s))
                    if w.kind == 'discard':
                        cur.add(self.initial[lo:hi])
            allowed[s] = cur
        self.cache[k] = allowed
        return allowed

    def check(self, k: int, guest: Optional[bytes]) -> Optional[str]:
        sizes = self.sizes(k)
        if guest is None or len(guest) not in sizes:
            return (f'guest size {len(guest or b"")} not in '
                    f'{sorted(sizes)}')
        nsec = len(guest) // SECTOR
        allowed = {s: v for s, v in self.allowed(k).items() if s < nsec}
        bad = []
        # untouched ranges must read their initial content
        g = memoryview(guest)
        ini = memoryview(self.initial)
        prev_end = 0
        for s in [t for t in self.touched if t < nsec] + [nsec]:
            lo = prev_end * SECTOR
            hi = s * SECTOR
            if hi > lo and g[lo:hi] != ini[lo:hi]:
                for t in range(prev_end, s):
                    a, b = t * SECTOR, (t + 1) * SECTOR
                    if g[a:b] != ini[a:b]:
                        bad.append((t, describe_sector(bytes(g[a:b]), self,
                                                       t, k) +
                                    ' (sector never written by the guest)'))
                        break
            prev_end = s + 1
        for s, vals in allowed.items():
            v = guest[s * SECTOR:(s + 1) * SECTOR]
            if v not in vals:
                bad.append((s, describe_sector(v, self, s, k)))
        if not bad:
            return None
        s, why = bad[0]
        return (f'{len(bad)} bad sector(s); first: guest offset '
                f'{s * SECTOR:#x}: {why}')


def describe_sector(v: bytes, model: GuestModel, s: int, k: int) -> str:
    lo = s * SECTOR
    if v == bytes(SECTOR):
        what = 'zeros'
    elif v == model.backing[lo:lo + SECTOR]:
        what = 'backing data'
    elif v == model.initial[lo:lo + SECTOR]:
        what = 'initial data'
    elif v == STALE:
        what = 'stale image-file data'
    elif v == bytes([v[0]]) * SECTOR:
        what = f'pattern {v[0]:#x}'
    else:
        what = 'garbage'
    dur = [w for w in model.durable_writes(k)
           if w.offset <= lo < w.offset + w.length]
    exp = f'pattern {dur[-1].pattern:#x}' if dur and \
        dur[-1].kind == 'write' else 'backing/initial data'
    return f'reads {what}, flushed content is {exp}'


def describe_state(st, durable, log: List[LogEntry], k: int) -> str:
    last = log[k - 1] if k > 0 else None
    where = f'crash after {last!r}' if last else 'crash before any write'
    # the unflushed sectors that made it to disk in this state
    extra: Dict[str, List[int]] = {}
    for (e, s) in sorted(set(st) | set(durable)):
        if st.get((e, s)) != durable.get((e, s)):
            extra.setdefault(e, []).append(s)
    parts = []
    for e, secs in extra.items():
        runs = []
        for s in secs:
            if runs and runs[-1][1] == s - 1:
                runs[-1][1] = s
            else:
                runs.append([s, s])
        parts.append(f'{e} ' + ','.join(
            f'{a}' if a == b else f'{a}-{b}' for a, b in runs[:4]) +
            (',...' if len(runs) > 4 else ''))
    return where + ('; unflushed sectors on disk: ' + '; '.join(parts)
                    if parts else '; only flushed data on disk')


class Result:
    def __init__(self, wl: Workload):
        self.wl = wl
        self.log: List[LogEntry] = []
        self.ops: List[GuestOp] = []
        self.violations: List[Tuple[int, str, str]] = []
        self.states = 0
        self.states_total = 0
        self.pairs = 0
        self.points = 0

    @property
    def ok(self) -> bool:
        return bool(self.violations) == self.wl.expect_violation

    def summary(self) -> str:
        w = sum(1 for e in self.log if e.kind == 'W')
        f = len(self.log) - w
        return (f'{self.wl.name}: {len(self.log)} log entries ({w} writes, '
                f'{f} flushes), {self.points} crash points, '
                f'{self.states} distinct states checked '
                f'(of {self.states_total} enumerated), '
                f'{len(self.violations)} violating (point, state) pairs')


# ---------------------------------------------------------------------------
# Helpers

def read_file(path: str) -> bytes:
    with open(path, 'rb') as f:
        return f.read()


def apply(buf: bytearray, offset: int, data: bytes) -> None:
    end = offset + len(data)
    if end > len(buf):
        buf.extend(bytes(end - len(buf)))
    buf[offset:end] = data


def state_key(st: Dict[str, bytes]) -> bytes:
    h = hashlib.sha256()
    for e in sorted(st):
        h.update(e.encode() + b'\0' + struct.pack('<Q', len(st[e])))
        h.update(st[e])
    return h.digest()


STALE = b'STALE!!!' * (SECTOR // 8)


def backing_pattern(size: int) -> bytes:
    """Backing data that differs from zeros and from every write pattern"""
    out = bytearray()
    for s in range(size // SECTOR):
        out += (b'BASE' + struct.pack('<I', s)) * (SECTOR // 8)
    return bytes(out)


# ---------------------------------------------------------------------------
# The workloads

class Patterns:
    """Hands out a distinct non-zero byte pattern per guest write"""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> str:
        self.n += 1
        return f'-P {0x10 + (self.n * 7) % 0xe0:#x}'


# In the quick run (make check), the largest cluster size only runs these
QUICK_LARGE = ('partial-alloc-c', 'concurrent-c', 'commit-c', 'resize-c',
               'mutant-skip-image-flush-c', 'mutant-bit-before-data-c')

# The negative controls: add-cow-mutants/NAME.patch breaks the ordering of
# an allocating write; scripts/build-mutant.sh builds it into its own
# qemu-img and qemu-io, which run the partial-alloc workload.  Every
# patch at the top of add-cow-mutants/ must be listed (main() checks).
MUTANT_PATCHES = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                              'add-cow-mutants')
MUTANTS = ('bit-before-data', 'flush-metadata', 'skip-image-flush')


def copy_mutants(src: str, dst: str) -> str:
    """Private copies of the mutants built in @src (NAME/bin/...)"""
    for name in MUTANTS:
        for prog in ('qemu-img', 'qemu-io'):
            path = os.path.join(src, name, 'bin', prog)
            if os.path.exists(path):
                d = os.path.join(dst, name, 'bin')
                os.makedirs(d, exist_ok=True)
                shutil.copy2(path, d)
    return dst


def workloads(fmt_name: str, cluster_sizes: List[int],
              negative: bool = True, quick: bool = False) -> List[Workload]:
    fcls = FORMATS[fmt_name]
    out: List[Workload] = []
    for c in cluster_sizes:
        size = max(16 * c, 256 * 1024)
        p = Patterns()
        half = max(c // 2, SECTOR)
        sec = SECTOR

        def fmt(sz: int = size) -> Format:
            return fcls(c, sz)

        def io(cmds: List[str], cache: str = 'writeback',
               opts: Optional[dict] = None) -> Step:
            return Step('io', cmds, cache=cache, opts=opts)

        # Allocating partial-cluster writes: head, tail, spanning two
        partial = [
            f'write {p()} {1 * c} {sec}',
            f'write {p()} {3 * c - sec} {sec}',
            'flush',
            f'write {p()} {4 * c + half} {c}',
            f'write {p()} {6 * c + sec if c > sec else 6 * c} {sec}',
            'flush',
        ]
        out.append(Workload(f'partial-alloc-c{c}', fmt(), [io(partial)]))
        out.append(Workload(f'partial-alloc-wt-c{c}', fmt(),
                            [io(partial, cache='writethrough')]))

        # Full-cluster writes, one and several clusters
        out.append(Workload(f'full-cluster-c{c}', fmt(), [io([
            f'write {p()} {2 * c} {c}',
            f'write {p()} {5 * c} {2 * c}',
            'flush',
            f'write {p()} {8 * c} {c}',
        ])]))

        # Rewrites of allocated clusters (no new bits)
        out.append(Workload(f'rewrite-c{c}', fmt(), [
            io([f'write {p()} {c} {2 * c}', 'flush']),
            io([f'write {p()} {c} {sec}',
                f'write {p()} {2 * c - sec} {2 * sec}',
                'flush',
                f'write {p()} {c + half} {sec}']),
        ]))

        # Concurrent writes: same cluster (distinct sectors), different
        # clusters, and the same sector twice in flight
        conc = [f'aio_write {p()} {3 * c} {sec}']
        if c > sec:
            conc.append(f'aio_write {p()} {3 * c + c - sec} {sec}')
        conc += [f'aio_write {p()} {7 * c} {c}',
                 f'aio_write {p()} {9 * c} {sec}',
                 f'aio_write {p()} {9 * c} {sec}',
                 'aio_flush', 'flush',
                 f'aio_write {p()} {10 * c} {sec}',
                 f'aio_write {p()} {11 * c} {sec}',
                 'aio_flush']
        out.append(Workload(f'concurrent-c{c}', fmt(), [io(conc)]))

        # Zero writes and discard over allocated and unallocated clusters
        out.append(Workload(f'zero-discard-c{c}', fmt(), [
            io([f'write {p()} 0 {4 * c}', 'flush',
                f'write -z {c} {c}',
                f'write -z {5 * c} {c}',
                'flush',
                f'discard {2 * c} {c}',
                f'discard {6 * c} {c}',
                'flush'])]))

        if fmt_name == 'add-cow':
            # More bitmap sectors dirty than the bitmap cache holds: clusters
            # 4096 apart sit in different bitmap sectors
            stride = 4096 * c
            n = 6
            big = max(size, n * stride)
            if big <= 64 * 1024 * 1024:
                cmds = [f'write {p()} {i * stride} {sec}' for i in range(n)]
                cmds.insert(3, 'flush')
                cmds.append('flush')
                out.append(Workload(f'cache-pressure-c{c}', fmt(big), [
                    io(cmds, opts={'cache-size': 512})]))

        # Commit into the backing file (which is then on NBD too) and
        # make_empty
        out.append(Workload(f'commit-c{c}', fmt(), [
            io([f'write {p()} {c} {c}', f'write {p()} {3 * c + sec} {sec}',
                'flush']),
            Step('img', args=['commit', '-q', '@IMG@']),
        ], base_on_nbd=True))

        # Safe rebase onto a backing file that differs in some sectors:
        # qemu-img copies the differing data into the image, then rewrites
        # the header; the guest content must never change
        out.append(Workload(f'rebase-c{c}', fmt(), [
            io([f'write {p()} {c} {sec}', 'flush']),
            Step('img', args=['rebase', '-q', '-F', 'raw', '-b',
                              '@WDIR@/new.raw', '@IMG@']),
        ], new_backing=True))

        # Resize grow and shrink (NBD cannot resize: the files are advertised
        # with room to grow)
        out.append(Workload(f'resize-c{c}', fmt(), [
            io([f'write {p()} {c} {sec}', f'write {p()} {size - sec} {sec}',
                'flush']),
            Step('img', args=['resize', '-q', '@IMG@', str(size + 4 * c)]),
            Step('img', args=['resize', '-q', '--shrink', '@IMG@',
                              str(size - 2 * c)]),
            Step('img', args=['resize', '-q', '@IMG@', str(size)]),
        ], grow={'meta': 1 << 20, 'image': 2 * size}))

        if negative and fmt_name == 'add-cow':
            for name in MUTANTS:
                out.append(Workload(f'mutant-{name}-c{c}', fmt(),
                                    [io(partial)], mutant=name,
                                    expect_violation=True))
    if quick and len(cluster_sizes) > 1:
        big = f'-c{max(cluster_sizes)}'
        out = [w for w in out if not w.name.endswith(big) or
               any(w.name.startswith(q) for q in QUICK_LARGE)]
    return out


def env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return int(v) if v else default


def run_all(wls: List[Workload], checker: Checker, log=print,
            figures=print) -> bool:
    ok = True
    totals = [0, 0, 0, 0]
    for wl in wls:
        t0 = time.monotonic()
        try:
            res = checker.run_workload(wl)
        except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
            log(f'{wl.name}: ERROR: {e}')
            ok = False
            continue
        figures(res.summary() + f' [{time.monotonic() - t0:.1f}s]')
        totals[0] += 1
        totals[1] += len(res.log)
        totals[2] += res.states
        totals[3] += res.pairs
        if wl.expect_violation:
            if res.violations:
                k, where, why = res.violations[0]
                log(f'{wl.name}: violation found as expected '
                    f'(negative control)')
                figures(f'  e.g. at log position {k}, {where}: {why}')
            else:
                log(f'{wl.name}: FAIL: negative control found no '
                    f'violating crash state')
                ok = False
        else:
            if res.violations:
                ok = False
                log(f'{wl.name}: FAIL: {len(res.violations)} violations')
                for k, where, why in res.violations[:5]:
                    log(f'  at log position {k}, {where}: {why}')
            else:
                log(f'{wl.name}: ok')
    figures(f'TOTAL: {totals[0]} workloads, {totals[1]} log entries, '
            f'{totals[2]} distinct crash states checked '
            f'({totals[3]} (crash point, state) pairs)')
    return ok


def default_checker(workdir: str, qemu_img: List[str], qemu_io: List[str],
                    long: bool = False, mutants_dir: str = '') -> Checker:
    return Checker(workdir, qemu_img, qemu_io, mutants_dir=mutants_dir,
                   exhaustive_bits=env_int('ADD_COW_CRASH_EXHAUSTIVE_BITS',
                                           12 if long else 6),
                   samples=env_int('ADD_COW_CRASH_SAMPLES',
                                   64 if long else 8),
                   max_states=env_int('ADD_COW_CRASH_MAX_STATES',
                                      20000 if long else 48),
                   seed=env_int('ADD_COW_CRASH_SEED', 1))


def main() -> int:
    import argparse
    ap = argparse.ArgumentParser(description='add-cow crash-state checker')
    ap.add_argument('--format', default='add-cow', choices=sorted(FORMATS))
    ap.add_argument('--long', action='store_true',
                    help='exhaustive bound 12, large sample and budget')
    ap.add_argument('--cluster-sizes', default='512,4096,65536')
    ap.add_argument('--only', default='', help='substring of workload names')
    ap.add_argument('--no-negative', action='store_true',
                    help='no mutant workloads')
    ap.add_argument('--build', default=os.path.join(
        os.path.dirname(os.path.abspath(__file__)),
        '../../../.build/build'))
    ap.add_argument('--mutants', default='',
                    help='where scripts/build-mutant.sh put the mutants '
                    '(default: BUILD/add-cow-mutants)')
    ap.add_argument('--workdir', default='')
    a = ap.parse_args()
    patches = sorted(f[:-len('.patch')] for f in os.listdir(MUTANT_PATCHES)
                     if f.endswith('.patch'))
    if not a.no_negative and patches != sorted(MUTANTS):
        print(f'MUTANTS {sorted(MUTANTS)} differs from the patches in '
              f'{MUTANT_PATCHES}: {patches}')
        return 1
    import tempfile
    workdir = a.workdir or tempfile.mkdtemp(prefix='add-cow-crash.')
    os.makedirs(workdir, exist_ok=True)
    # Private copies: a concurrent rebuild must not swap the tools mid-run
    tools = []
    for var, prog in (('QEMU_IMG_PROG', 'qemu-img'), ('QEMU_IO_PROG',
                                                      'qemu-io')):
        src = os.environ.get(var, os.path.join(a.build, prog))
        dst = os.path.join(workdir, prog)
        shutil.copy2(src, dst)
        tools.append([dst])
    qemu_img, qemu_io = tools
    mutants = copy_mutants(a.mutants or os.path.join(a.build,
                                                     'add-cow-mutants'),
                           os.path.join(workdir, 'mutants'))
    checker = default_checker(workdir, qemu_img, qemu_io, a.long, mutants)
    wls = [w for w in workloads(a.format,
                                [int(x) for x in a.cluster_sizes.split(',')],
                                not a.no_negative, quick=not a.long)
           if a.only in w.name]
    t0 = time.monotonic()
    ok = run_all(wls, checker)
    print(f'runtime {time.monotonic() - t0:.0f}s; '
          f'{"PASS" if ok else "FAIL"}')
    if not a.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
