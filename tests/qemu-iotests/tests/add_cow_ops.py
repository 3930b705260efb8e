# Differential operation-sequence tester for add-cow, with qcow2 as oracle
#
# Copyright (c) 2026 The add-cow authors
#
# SPDX-License-Identifier: GPL-2.0-or-later
#
# How it works
# ============
#
# Two chains are built side by side over the same backing data, each in
# its own directory under the same file names:
#
#   Q:  base (raw or qcow2) <- L1.ov (qcow2)   <- L2.ov (qcow2)
#   A:  base (raw or qcow2) <- L1.ov (add-cow) <- L2.ov (add-cow)
#
# with the same cluster size.  A seeded random sequence of operations is
# applied to both, first to Q (the oracle), then to A:
#  - online, each chain in a QEMU process of its own (qtest, the active
#    layer the disk of a virtio-blk device, as with a guest): writes, zero
#    writes with and without may-unmap, discards and flushes (HMP qemu-io,
#    random offsets and lengths, unaligned too), blockdev-reopen
#    read-only/read-write, change-backing-file (also ""), block-stream
#    (with and without base-node, with backing-file), block-commit
#    (intermediate and active), blockdev-snapshot-sync, block_resize (grow
#    and shrink); an open with "backing": null now and then;
#  - offline, QEMU stopped: qemu-img rebase (safe and -u, to "" or another
#    image), qemu-img commit (plain, -d, -b), qemu-img amend, qemu-img
#    resize; then qemu-img check -r all on every image.
#
# After every step, every layer of both chains is read in full (online
# through a read-only NBD export of its node and the small NBD client
# below, offline with qemu-img convert) and compared byte for byte,
# together with the virtual sizes and the shape of the chains (file names
# from the active layer down).  qemu-img check -r all must not crash, must
# find nothing to repair on add-cow and must leave every layer's content
# as it was.
#
# Outcomes of one operation:
#  - both succeed: the contents must be equal;
#  - both fail: neither content may have changed;
#  - only add-cow fails: its content must be unchanged, and the refusal
#    must be one of LEGIT_REFUSALS (else it is a divergence).  If qcow2's
#    content changed, the chains are out of step and the sequence ends;
#  - only qcow2 fails: noted, as long as the contents are still equal;
#  - a crash (QEMU or qemu-img killed by a signal, QMP gone) is always a
#    divergence.
#
# Where the formats may legitimately differ, the difference is checked to
# be only that, noted, and both chains are brought back in step by the
# same guest write of zeros:
#  - a discarded byte may read as before or as zero (qcow2 makes discarded
#    clusters read zeros, add-cow may keep unallocated ones reading the
#    backing file);
#  - a byte that reads zero through a discard, or a zero write without
#    backing file, may be an unallocated cluster in one format and a zero
#    cluster in the other; after qemu-img rebase -u gives the layer other
#    backing data, it may read zero in one chain and the new backing data
#    in the other.
#
# A divergence prints the seed of the sequence, every operation applied so
# far and the first differing offset; ADD_COW_OPS_SEED=<seed> replays that
# one sequence (given the same binaries).

import hashlib
import json
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from typing import Callable, Dict, Iterable, List, Optional, Tuple

# Refusals by add-cow of an operation qcow2 accepts that are legitimate:
# (operation kind, regular expression on the error message, why).
LEGIT_REFUSALS: List[Tuple[str, str, str]] = [
    ('amend', 'reads unallocated clusters from its backing file',
     'image_file_raw=on needs an image without backing file; the qcow2 '
     'side toggles lazy_refcounts, which has no such condition'),
]

KB = 1024
MB = 1024 * 1024


class Crash(Exception):
    """QEMU or a tool died from a signal (or QMP went away)"""


class OpFailed(Exception):
    """An operation was refused or failed (cleanly)"""


# ---------------------------------------------------------------------------
# A minimal NBD client: fixed newstyle, NBD_OPT_EXPORT_NAME, simple replies

NBD_MAGIC = 0x4e42444d41474943
NBD_OPTS_MAGIC = 0x49484156454F5054
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_FLAG_FIXED_NEWSTYLE = 1     # handshake flags; the client's are the same
NBD_FLAG_NO_ZEROES = 2
NBD_OPT_EXPORT_NAME = 1
NBD_CMD_READ = 0
NBD_CMD_DISC = 2


def _recv(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError('NBD server closed the connection')
        buf += chunk
    return bytes(buf)


def nbd_read_export(path: str, name: str) -> bytes:
    """Read a whole NBD export over the UNIX socket @path"""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(60)
        s.connect(path)
        magic, opts_magic, hflags = struct.unpack('>QQH', _recv(s, 18))
        if magic != NBD_MAGIC or opts_magic != NBD_OPTS_MAGIC:
            raise ConnectionError('not an NBD newstyle server')
        cflags = NBD_FLAG_FIXED_NEWSTYLE
        no_zeroes = hflags & NBD_FLAG_NO_ZEROES
        if no_zeroes:
            cflags |= NBD_FLAG_NO_ZEROES
        ename = name.encode()
        s.sendall(struct.pack('>IQII', cflags, NBD_OPTS_MAGIC,
                              NBD_OPT_EXPORT_NAME, len(ename)) + ename)
        size, _tflags = struct.unpack('>QH', _recv(s, 10))
        if not no_zeroes:
            _recv(s, 124)
        data = bytearray()
        handle = 0
        while len(data) < size:
            n = min(MB, size - len(data))
            handle += 1
            s.sendall(struct.pack('>IHHQQI', NBD_REQUEST_MAGIC, 0,
                                  NBD_CMD_READ, handle, len(data), n))
            rmagic, err, rhandle = struct.unpack('>IIQ', _recv(s, 16))
            if rmagic != NBD_SIMPLE_REPLY_MAGIC or rhandle != handle:
                raise ConnectionError('bad NBD reply')
            if err:
                raise OpFailed(f'NBD read error {err} at {len(data)}')
            data += _recv(s, n)
        s.sendall(struct.pack('>IHHQQI', NBD_REQUEST_MAGIC, 0, NBD_CMD_DISC,
                              0, 0, 0))
        return bytes(data)


# ---------------------------------------------------------------------------
# Tools

class Tools:
    def __init__(self, qemu_img: str, qemu_io: str, qemu_prog: str,
                 sock_dir: str):
        self.qemu_img = qemu_img
        self.qemu_io = qemu_io
        self.qemu_prog = qemu_prog
        self.sock_dir = sock_dir

    @staticmethod
    def _run(args: List[str]) -> Tuple[int, str]:
        p = subprocess.run(args, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True,
                           check=False, timeout=300)
        if p.returncode < 0:
            raise Crash(f'{os.path.basename(args[0])} killed by signal '
                        f'{-p.returncode}: {" ".join(args[1:])}\n'
                        f'{p.stdout[-2000:]}')
        return p.returncode, p.stdout

    def img(self, *args: str) -> Tuple[int, str]:
        return self._run([self.qemu_img] + list(args))

    def io(self, fmt: str, path: str, *cmds: str) -> Tuple[int, str]:
        args = [self.qemu_io, '-f', fmt]
        for c in cmds:
            args += ['-c', c]
        return self._run(args + [path])


def io_failed(out: str) -> bool:
    """qemu-io prints errors but may still exit 0"""
    return bool(re.search(r'failed|error|Error|Could not|not permitted',
                          out))


def file_name(filename: str) -> str:
    """The base name of the image file behind @filename, which may be a
    json: description (e.g. of a node opened with backing: null, which a
    snapshot on top then names as its backing file)"""
    if filename.startswith('json:'):
        opts = json.loads(filename[5:])
        while isinstance(opts.get('file'), dict):
            opts = opts['file']
        filename = opts.get('file.filename', opts.get('filename', filename))
    return os.path.basename(filename)


def files_digest(directory: str) -> str:
    """A hash of the names and contents of the files in @directory"""
    h = hashlib.sha256()
    for name in sorted(os.listdir(directory)):
        h.update(name.encode() + b'\0')
        with open(os.path.join(directory, name), 'rb') as f:
            h.update(f.read())
    return h.hexdigest()


def first_difference(a: bytes, b: bytes) -> int:
    """Offset of the first differing byte, or -1 (a size difference
    counts at the shorter length)"""
    n = min(len(a), len(b))
    if a[:n] != b[:n]:
        lo, hi = 0, n
        while hi - lo > 4096:
            mid = (lo + hi) // 2
            if a[lo:mid] != b[lo:mid]:
                hi = mid
            else:
                lo = mid
        for i in range(lo, hi):
            if a[i] != b[i]:
                return i
    return n if len(a) != len(b) else -1


# ---------------------------------------------------------------------------
# One chain

class Side:
    def __init__(self, key: str, fmt: str, root: str):
        self.key = key
        self.fmt = fmt
        self.dir = os.path.join(root, key)
        self.vm = None
        self.chain: List[str] = []          # file names, active first
        self.last: Dict[str, bytes] = {}    # layer name -> content

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def fmt_of(self, name: str) -> str:
        return name.split('.')[-1] if name.startswith('base.') else self.fmt


# ---------------------------------------------------------------------------
# The tester

class Divergence(Exception):
    pass


class Refusal(Exception):
    """The chains are out of step without a divergence (a legitimate
    refusal by add-cow, an unreadable oracle): the sequence ends"""


class OpsTester:
    def __init__(self, tools: Tools, workdir: str,
                 log: Callable[[str], None] = print,
                 verbose: bool = False,
                 progress: Optional[Callable[[str], None]] = None):
        self.tools = tools
        self.workdir = workdir
        self.log = log
        self.verbose = verbose
        self.progress = progress
        self.applied: Counter = Counter()       # operation kind -> count
        self.outcomes: Counter = Counter()      # (kind, outcome) -> count
        self.divergences: List[str] = []
        self.refusals: List[str] = []
        self.notes: Dict[str, List[int]] = {}  # note -> count, first seed
        self.sequences = 0
        self.steps = 0
        self.weights: Dict[str, int] = {}
        for item in filter(None, os.environ.get('ADD_COW_OPS_WEIGHTS',
                                                '').split(',')):
            k, w = item.split('=')
            self.weights[k] = int(w)

    # -- helpers ------------------------------------------------------------

    def vlog(self, msg: str) -> None:
        if self.verbose:
            self.log(msg)

    @staticmethod
    def died(side: Side, what: str, exc: Exception) -> Crash:
        """QMP went away (or hung) during @what: reap QEMU, describe it"""
        vm = side.vm
        try:
            vm.wait(timeout=10)
        except Exception:  # pylint: disable=broad-except
            vm.kill()
        code = vm.exitcode()
        how = (f'killed by signal {-code}' if code is not None and code < 0
               else f'exit code {code}')
        return Crash(f'QEMU {how} during {what} ({type(exc).__name__})\n'
                     f'{(vm.get_log() or "").strip()[-3000:]}')

    def qmp(self, side: Side, cmd: str, **args) -> dict:
        """A QMP command; returns the reply (with 'return' or 'error')"""
        try:
            return side.vm.qmp(cmd, **args)
        except Exception as e:
            raise self.died(side, cmd, e) from e

    def qmp_ok(self, side: Side, cmd: str, **args) -> dict:
        r = self.qmp(side, cmd, **args)
        if 'error' in r:
            raise OpFailed(f'{cmd}: {r["error"]["desc"]}')
        return r['return']

    def hmp_io(self, side: Side, cmd: str) -> str:
        out = self.qmp_ok(side, 'human-monitor-command',
                          **{'command-line':
                             f'qemu-io {self.active_node(side)} "{cmd}"'})
        if io_failed(out):
            raise OpFailed(f'qemu-io {cmd}: {out.strip()}')
        return out

    def wait_job(self, side: Side, job: str, complete: bool) -> None:
        vm = side.vm
        match = {'data': {'device': job}}
        while True:
            try:
                ev = vm.events_wait([('BLOCK_JOB_READY', match),
                                     ('BLOCK_JOB_COMPLETED', match),
                                     ('BLOCK_JOB_CANCELLED', match)],
                                    timeout=120)
            except Exception as e:
                raise self.died(side, f'job {job}', e) from e
            if ev is None:
                raise OpFailed(f'job {job} timed out')
            if ev['event'] == 'BLOCK_JOB_READY':
                if complete:
                    self.qmp_ok(side, 'block-job-complete', device=job)
                continue
            if ev['event'] == 'BLOCK_JOB_CANCELLED':
                raise OpFailed(f'job {job} cancelled')
            if 'error' in ev['data']:
                raise OpFailed(f'job {job}: {ev["data"]["error"]}')
            return

    # -- online: VM, nodes, reading ------------------------------------------

    def launch(self, side: Side, null_backing: bool = False) -> None:
        """Start QEMU with the active layer as the disk of a guest device.

        The device is what keeps the chain alive and follows it through
        snapshots and active commits, as with a real guest.  It is plugged
        while the node is read-only and with share-rw, so that it takes no
        write permission: the node can then be reopened read-only, resized
        and written by HMP qemu-io like any node."""
        # QEMU's python/ directory: on sys.path in the iotests, added by
        # main() otherwise
        # pylint: disable-next=import-outside-toplevel
        from qemu.machine import qtest
        vm = qtest.QEMUQtestMachine(
            self.tools.qemu_prog, args=['-nodefaults', '-display', 'none',
                                        '-machine', 'pc'],
            name=f'ops-{side.key}-{os.getpid()}',
            base_temp_dir=self.workdir, qmp_timer=120.0)
        side.vm = vm
        vm.launch()
        node = f'{side.key}top'
        opts = {'driver': side.fmt_of(self.active), 'node-name': node,
                'discard': 'unmap', 'read-only': True,
                'file': {'driver': 'file', 'filename': side.path(self.active),
                         'node-name': f'{node}-file'}}
        if null_backing:
            opts['backing'] = None
        try:
            self.qmp_ok(side, 'blockdev-add', **opts)
            self.qmp_ok(side, 'device_add', driver='virtio-blk-pci',
                        id='disk', drive=node, **{'share-rw': True})
            self.reopen(side, False)
            self.qmp_ok(side, 'nbd-server-start',
                        addr={'type': 'unix', 'data': {
                            'path': self.nbd_sock(side)}})
        except OpFailed:
            side.vm = None
            vm.shutdown()
            raise

    def active_node(self, side: Side) -> str:
        """The node the guest device sees"""
        for dev in self.qmp_ok(side, 'query-block'):
            if dev.get('qdev', '').startswith('/machine/peripheral/disk/'):
                return dev['inserted']['node-name']
        raise OpFailed('the guest device has gone')

    def reopen(self, side: Side, ro: bool) -> None:
        """blockdev-reopen of the active layer, everything else kept"""
        node = self.active_node(side)
        graph = self.qmp_ok(side, 'x-debug-query-block-graph')
        by_id = {x['id']: x['name'] for x in graph['nodes']}
        kids = {e['name']: by_id[e['child']] for e in graph['edges']
                if by_id[e['parent']] == node}
        chain = self.online_chain(side)
        # every child by reference (add-cow's image-file too): a child
        # left out would be reset to its defaults
        opts = dict(kids)
        opts.update({'driver': side.fmt_of(chain[0][1]), 'node-name': node,
                     'read-only': ro, 'discard': 'unmap'})
        if opts['driver'] != 'raw':
            opts['backing'] = chain[1][0] if len(chain) > 1 else None
        self.qmp_ok(side, 'blockdev-reopen', options=[opts])

    def nbd_sock(self, side: Side) -> str:
        return os.path.join(self.tools.sock_dir,
                            f'ops-{os.getpid()}-{side.key}.sock')

    def shutdown(self, side: Side) -> None:
        vm, side.vm = side.vm, None
        if vm is None:
            return
        try:
            vm.shutdown()
        except Exception as e:
            raise Crash(f'QEMU did not shut down cleanly: {e}\n'
                        f'{(vm.get_log() or "")[-3000:]}') from e
        if vm.exitcode() not in (0, None):
            raise Crash(f'QEMU exited with {vm.exitcode()}\n'
                        f'{(vm.get_log() or "")[-3000:]}')

    def online_chain(self, side: Side) -> List[Tuple[str, str]]:
        """(node name, file name) from the active layer down; the file
        name is that of the node's protocol child (a format node's own
        name may have become a json: description)"""
        graph = self.qmp_ok(side, 'x-debug-query-block-graph')
        nodes = self.qmp_ok(side, 'query-named-block-nodes', flat=True)
        files = {n['node-name']: n['file'] for n in nodes}
        by_id = {n['id']: n['name'] for n in graph['nodes']}
        kids: Dict[Tuple[str, str], str] = {}
        for e in graph['edges']:
            kids[(by_id[e['parent']], e['name'])] = by_id[e['child']]
        chain = []
        node = self.active_node(side)
        while node and len(chain) < 64:
            proto = kids.get((node, 'file'), node)
            chain.append((node, os.path.basename(files.get(proto, '?'))))
            node = kids.get((node, 'backing'))
        return chain

    def read_online(self, side: Side, node: str) -> bytes:
        """The content of @node as its parents see it"""
        self.qmp_ok(side, 'block-export-add', type='nbd', id='ops',
                    **{'node-name': node}, name='ops', writable=False)
        try:
            data = nbd_read_export(self.nbd_sock(side), 'ops')
        except OSError as e:
            raise self.died(side, 'an NBD read', e) from e
        finally:
            if side.vm.is_running():
                self.qmp_ok(side, 'block-export-del', id='ops')
                try:
                    side.vm.event_wait('BLOCK_EXPORT_DELETED', timeout=60)
                except Exception as e:
                    raise self.died(side, 'block-export-del', e) from e
        return data

    # -- offline: layers and reading ------------------------------------------

    def chain_info(self, side: Side) -> List[dict]:
        """qemu-img info of every image from the active layer down, from
        the headers"""
        rc, out = self.tools.img('info', '--backing-chain', '-U',
                                 '--output=json', '-f',
                                 side.fmt_of(self.active),
                                 side.path(self.active))
        if rc != 0:
            raise OpFailed(f'qemu-img info: {out.strip()}')
        return json.loads(out)

    def offline_chain(self, side: Side) -> List[str]:
        """File names from the active layer down, from the headers"""
        return [file_name(i['filename']) for i in self.chain_info(side)]

    def json_null_nodes(self) -> List[str]:
        """The layer that the next open opens without backing file
        although its header names one: the first that the layer above
        names by a json: description with "backing": null (as a snapshot
        on top of a node opened so stores it)"""
        try:
            infos = self.chain_info(self.Q)
        except OpFailed:
            return []
        for info in infos:
            name = info.get('backing-filename', '')
            if name.startswith('json:') and \
                    json.loads(name[5:]).get('backing', '') is None:
                return [file_name(name)]
        return []

    def read_offline(self, side: Side, name: str) -> bytes:
        out = os.path.join(self.workdir, f'dump-{side.key}.raw')
        rc, msg = self.tools.img('convert', '-U', '-f', side.fmt_of(name),
                                 '-O', 'raw', side.path(name), out)
        if rc != 0:
            raise OpFailed(f'qemu-img convert {name}: {msg.strip()}')
        with open(out, 'rb') as f:
            data = f.read()
        os.unlink(out)
        return data

    # -- state and comparison ---------------------------------------------

    def state(self, side: Side) -> Tuple[List[str], Dict[str, bytes]]:
        """Chain (file names from the active layer down) and the content
        of every layer of it"""
        if side.vm is not None:
            chain = self.online_chain(side)
            # every layer: a change below the active layer may only show
            # in the guest's view much later (after a commit, say)
            return ([f for _, f in chain],
                    {f: self.read_online(side, n) for n, f in chain})
        chain = self.offline_chain(side)
        return chain, {name: self.read_offline(side, name) for name in chain}

    @staticmethod
    def diff_views(va: Dict[str, bytes], vq: Dict[str, bytes],
                   la: str = 'add-cow', lq: str = 'qcow2') -> str:
        for name in vq:
            a, q = va.get(name), vq[name]
            if a is None:
                return f'{name}: missing in {la}'
            off = first_difference(a, q)
            if off < 0:
                continue
            if len(a) != len(q) and off == min(len(a), len(q)):
                return (f'{name}: virtual size {len(a)} ({la}) != '
                        f'{len(q)} ({lq})')
            end = off
            while end < min(len(a), len(q)) and a[end] != q[end]:
                end += 1
            return (f'{name}: first differing offset {off} (0x{off:x}): '
                    f'{la} 0x{a[off]:02x}, {lq} 0x{q[off]:02x}; '
                    f'{end - off} differing bytes from there')
        return ''

    def note(self, msg: str) -> None:
        """Record something that is not a divergence, with a seed to
        replay it"""
        self.notes.setdefault(' '.join(msg.split()), [0, self.seed])[0] += 1

    def short(self, msg: str) -> str:
        """@msg without the directory of the sequence, cut to a line"""
        for side in self.sides:
            msg = msg.replace(side.dir + '/', '')
        return ' '.join(msg.split())[:300]

    def diverge(self, msg: str) -> None:
        raise Divergence(msg)

    # -- applying one operation to both chains -----------------------------

    def apply(self, kind: str, desc: str, run: Callable[[Side], None],
              online: bool, loose: Optional[Tuple[int, int]] = None,
              rebased: Optional[Dict[str, List[Tuple[int, int]]]] = None,
              one_way: bool = False,
              grown: Optional[Tuple[str, int]] = None) -> None:
        """Apply an operation to Q, then to A, and compare.  @loose is
        the range of a discard, whose content is not defined afterwards
        (see discard_differences()); @rebased the layers that the operation
        gave other backing data, with their ranges where zeros may be told
        apart, @one_way whether only qcow2 may read the new backing data
        there (see rebase_differences()); @grown the layer a resize
        acted on and its old size (see grow_differences())"""
        self.steps += 1
        self.history.append(desc)
        self.applied[kind] += 1
        errors: Dict[str, Optional[str]] = {}
        for side in self.sides:
            try:
                run(side)
                errors[side.key] = None
            except OpFailed as e:
                errors[side.key] = str(e)
            except Crash as e:
                self.outcomes[(kind, 'crash')] += 1
                self.diverge(f'{"add-cow" if side.key == "A" else "qcow2"} '
                             f'crashed: {e}')
        qerr, aerr = errors['Q'], errors['A']
        outcome = {(False, False): 'ok', (True, True): 'both-failed',
                   (False, True): 'add-cow-refused',
                   (True, False): 'qcow2-refused'}[(qerr is not None,
                                                    aerr is not None)]
        self.outcomes[(kind, outcome)] += 1
        self.vlog(f'  [{self.steps}] {desc}: {outcome}'
                  + (f' (qcow2: {qerr})' if qerr else '')
                  + (f' (add-cow: {aerr})' if aerr else ''))
        states, unreadable = {}, {}
        for s in self.sides:
            try:
                states[s.key] = self.state(s)
            except OpFailed as e:
                unreadable[s.key] = self.short(str(e))
            except Crash as e:
                self.diverge(f'crash reading the {s.fmt} chain: {e}')
        if 'Q' in unreadable:
            # The oracle itself cannot be opened any more (e.g. a snapshot
            # of a node whose backing differs from its header stores a
            # json: backing name that qemu-img rejects): nothing to compare
            # against, the sequence ends
            self.note(f'{kind}: the qcow2 chain could not be read '
                      f'afterwards, sequence ended: {unreadable["Q"]}'
                      + ('' if 'A' in unreadable else
                         ' (the add-cow chain could)'))
            raise Refusal(unreadable['Q'])
        if 'A' in unreadable:
            self.diverge(f'the add-cow chain cannot be read: '
                         f'{unreadable["A"]}')
        (ca, va), (cq, vq) = states['A'], states['Q']
        if aerr and not qerr:
            d = self.diff_views(va, self.A.last, 'now', 'before')
            if d or ca != self.A.chain:
                self.diverge(f'add-cow failed ({aerr}) and changed the '
                             f'content: {d or f"chain {ca}"}')
            why = [w for k, rx, w in LEGIT_REFUSALS
                   if k == kind and re.search(rx, aerr)]
            if not why:
                self.diverge(f'add-cow refused what qcow2 did: {aerr}')
            self.refusals.append(f'{kind}: {why[0]}')
            if self.diff_views(vq, self.Q.last) or cq != self.Q.chain:
                # qcow2 changed, add-cow did not: out of step from here
                raise Refusal(aerr)
            # a no-op for qcow2: both chains are still in step
        elif qerr and aerr:
            for s, c, v in ((self.A, ca, va), (self.Q, cq, vq)):
                d = self.diff_views(v, s.last, 'now', 'before')
                if d or c != s.chain:
                    self.diverge(f'{s.fmt} failed ({errors[s.key]}) and '
                                 f'changed the content: '
                                 f'{d or f"chain {c}"}')
        if ca != cq:
            self.diverge(f'chains differ: add-cow {ca}, qcow2 {cq}')
        if loose and not qerr and not aerr:
            va, vq = self.discard_differences(loose, va, vq)
        if grown and not qerr and not aerr and ca == cq:
            va, vq = self.grow_differences(kind, grown, va, vq, online)
        if rebased and not qerr and not aerr and ca == cq:
            for layer, ranges in rebased.items():
                if layer in cq:
                    va, vq = self.rebase_differences(kind, layer, ranges, cq,
                                                     va, vq, one_way)
        d = self.diff_views(va, vq)
        if d:
            self.diverge(d + (f' (qcow2 failed: {qerr})' if qerr else ''))
        if qerr and not aerr:
            self.note(f'{kind}: qcow2 refused ({qerr}), add-cow '
                      f'did it with the same result')
        for s, c, v in ((self.A, ca, va), (self.Q, cq, vq)):
            s.chain, s.last = c, v
        self.size = len(vq[cq[0]])
        if not online:
            self.check_all()

    def discard_differences(self, rng: Tuple[int, int],
                            va: Dict[str, bytes], vq: Dict[str, bytes]
                            ) -> Tuple[Dict[str, bytes], Dict[str, bytes]]:
        """After a discard, a discarded byte may read as before or as
        zero: qcow2 makes every discarded cluster read zeros, add-cow keeps
        an unallocated cluster reading its backing file.  Where both read
        one of the two but not the same, zero the bytes in both chains
        (a guest write of zeros, the same in both) so that they go on in
        step, and note it.  Any other difference is left for the caller."""
        name = self.Q.chain[0]
        a, q, old = va.get(name), vq.get(name), self.Q.last.get(name)
        if a is None or q is None or old is None or \
                not len(a) == len(q) == len(old) or a == q:
            return va, vq
        lo, hi = rng
        runs = []
        pos = 0
        while True:
            off = first_difference(a[pos:], q[pos:])
            if off < 0:
                break
            i = j = pos + off
            while j < len(a) and a[j] != q[j]:
                if not lo <= j < hi or a[j] not in (0, old[j]) or \
                        q[j] not in (0, old[j]):
                    return va, vq
                j += 1
            runs.append((i, j))
            pos = j
        for side in self.sides:
            for start, end in runs:
                self.hmp_io(side, f'write -z {start} {end - start}')
        self.note('discard: qcow2 reads zeros where add-cow keeps '
                  'the old data (zeroed in both to go on)')
        self.outcomes[('discard', 'differs-legitimately')] += 1
        return self.state(self.A)[1], self.state(self.Q)[1]

    def grow_differences(self, kind: str, grown: Tuple[str, int],
                         va: Dict[str, bytes], vq: Dict[str, bytes],
                         online: bool
                         ) -> Tuple[Dict[str, bytes], Dict[str, bytes]]:
        """The area a resize added must read zeros.  add-cow must do so;
        qcow2 does not always: after a shrink to the middle of a cluster
        and a grow without a longer backing file, it shows the old data of
        that cluster's tail (QEMU 10.2 qcow2_co_truncate() zeroes the new
        area only for BDRV_REQ_ZERO_WRITE).  Where only qcow2 is wrong,
        note it and zero the bytes in both chains.  A qcow2 base image is
        qcow2 in both chains: there either may show the data the image
        had before its last shrink (self.ghosts), as long as every
        differing byte is zero or that data."""
        layer, old = grown
        a, q = va.get(layer, b''), vq.get(layer, b'')
        if len(q) < old and layer in self.Q.last:
            # a shrink: what a later grow may show again in qcow2
            prev = self.Q.last[layer]
            self.ghosts[layer] = prev + \
                self.ghosts.get(layer, b'')[len(prev):]
        if len(a) != len(q) or len(a) <= old:
            return va, vq
        addcow = self.A.fmt_of(layer) == 'add-cow'
        off = first_difference(a[old:], bytes(len(a) - old))
        if off >= 0 and addcow:
            self.diverge(f'{layer}: the area added by the resize does not '
                         f'read zeros at {old + off} in add-cow '
                         f'(0x{a[old + off]:02x})')
        if q[old:] == a[old:]:
            if off >= 0:
                self.note(f'{kind}: a qcow2 base image shows old data in '
                          f'the area added by a grow after a shrink into a '
                          f'cluster, the same in both chains')
                self.outcomes[(kind, 'qcow2-stale')] += 1
            return va, vq
        ghost = self.ghosts.get(layer, b'')
        runs = []
        pos = old
        while True:
            off = first_difference(q[pos:], a[pos:])
            if off < 0:
                break
            start = end = pos + off
            while end < len(q) and q[end] != a[end]:
                if not addcow and any(
                        v and (end >= len(ghost) or v != ghost[end])
                        for v in (a[end], q[end])):
                    return va, vq
                end += 1
            runs.append((start, end))
            pos = end
        for side in self.sides:
            cmds = [f'write -z {s} {e - s}' for s, e in runs]
            if online:
                for cmd in cmds:
                    self.hmp_io(side, cmd)
            else:
                rc, out = self.tools.io(side.fmt_of(layer), side.path(layer),
                                        *cmds)
                if rc != 0 or io_failed(out):
                    self.diverge(f'{side.fmt}: could not zero {layer}: '
                                 f'{out}')
        self.note(f'{kind}: qcow2 shows old data in the area added by a '
                  f'grow after a shrink into a cluster, '
                  + ('add-cow zeros' if addcow else
                     'a qcow2 base image differently in the two chains')
                  + ' (zeroed in both to go on)')
        self.outcomes[(kind, 'qcow2-stale')] += 1
        return self.state(self.A)[1], self.state(self.Q)[1]

    def mark_loose(self, layer: str, start: int, end: int) -> None:
        """[start, end) of @layer reads zeros in both chains, but one may
        say so with unallocated clusters and the other with zero clusters:
        a difference that only shows once the layer has other backing data
        (rebase_differences())"""
        self.loose.setdefault(layer, []).append((start, end))

    def move_loose(self, src: List[str], dst: str) -> None:
        """The data of the layers @src went into @dst (commit, stream)"""
        for layer in src:
            self.loose.setdefault(dst, []).extend(self.loose.get(layer, []))

    def rebase_differences(self, kind: str, layer: str,
                           ranges: List[Tuple[int, int]], chain: List[str],
                           va: Dict[str, bytes], vq: Dict[str, bytes],
                           one_way: bool = False
                           ) -> Tuple[Dict[str, bytes], Dict[str, bytes]]:
        """When @layer gets other backing data (qemu-img rebase -u; the
        normal open after a session with backing: null), a byte in
        @ranges that read zero through a zero write or a discard may read
        the new backing data in one chain (an unallocated cluster there)
        and zero in the other (a zero cluster); with @one_way, only qcow2
        may read the new data.  Where that is the only difference, zero
        the bytes in both chains and note it; anything else is left for
        the caller."""
        i = chain.index(layer)
        a, q, old = va[layer], vq[layer], self.Q.last.get(layer, b'')
        new = vq[chain[i + 1]] if i + 1 < len(chain) else b''
        if len(a) != len(q) or a == q:
            return va, vq
        mask = bytearray(len(a))
        for start, end in ranges:
            end = min(end, len(a))
            if start < end:
                mask[start:end] = b'\x01' * (end - start)
        runs = []
        pos = 0
        while True:
            off = first_difference(a[pos:], q[pos:])
            if off < 0:
                break
            start = j = pos + off
            while j < len(a) and a[j] != q[j]:
                allowed = (0, old[j] if j < len(old) else 0,
                           new[j] if j < len(new) else 0)
                if not mask[j] or a[j] not in allowed or \
                        q[j] not in allowed or (one_way and a[j] != 0):
                    return va, vq
                j += 1
            runs.append((start, j))
            pos = j
        for side in self.sides:
            rc, out = self.tools.io(side.fmt_of(layer), side.path(layer),
                                    *[f'write -z {s} {e - s}'
                                      for s, e in runs])
            if rc != 0 or io_failed(out):
                self.diverge(f'{side.fmt}: could not zero {layer}: {out}')
        self.note(f'{kind}: the new backing data shows through where one '
                  f'chain has unallocated clusters and the other zero '
                  f'clusters (zeroed in both to go on)')
        self.outcomes[(kind, 'differs-legitimately')] += 1
        return self.state(self.A)[1], self.state(self.Q)[1]

    def check_all(self) -> None:
        """qemu-img check -r all on every image of both chains: no crash,
        no repair needed on add-cow, every layer's content unchanged"""
        for side in self.sides:
            before = files_digest(side.dir)
            for name in side.chain:
                fmt = side.fmt_of(name)
                if fmt == 'raw':
                    continue
                try:
                    rc, out = self.tools.img('check', '-r', 'all', '-f', fmt,
                                             side.path(name))
                except Crash as e:
                    self.diverge(f'qemu-img check -r all crashed on '
                                 f'{side.fmt} {name}: {e}')
                self.applied['check'] += 1
                repaired = 'repaired' in out or 'Repairing' in out
                if rc != 0 or repaired:
                    what = f'{side.fmt} {name}: check -r all exit {rc}: ' + \
                        ' / '.join(out.strip().splitlines()[:6])
                    if side.key == 'A':
                        self.diverge(what)
                    self.note(self.short(what))
            if side.key == 'Q':
                continue    # the oracle's own repairs are not under test
            if files_digest(side.dir) == before:
                continue    # not a byte written: nothing can have changed
            try:
                chain, views = self.state(side)
            except OpFailed as e:
                self.diverge(f'add-cow: unreadable after check -r all: '
                             f'{self.short(str(e))}')
            if chain != side.chain:
                self.diverge(f'{side.fmt}: check -r all changed the chain '
                             f'{side.chain} -> {chain}')
            d = self.diff_views(views, side.last, 'after', 'before')
            if d:
                self.diverge(f'{side.fmt}: check -r all changed the '
                             f'content: {d}')

    # -- random choices ------------------------------------------------------

    def rand_pos(self, limit: int) -> int:
        k = self.rng.random()
        if k < 0.4:
            return self.rng.randrange(0, limit // self.cluster + 1) * \
                self.cluster
        if k < 0.6:
            return self.rng.randrange(0, limit // 512 + 1) * 512
        return self.rng.randrange(0, limit + 1)

    def rand_extent(self) -> Tuple[int, int]:
        size = self.size
        if self.rng.random() < 0.05:
            return 0, size
        off = min(self.rand_pos(size), size - 1)
        k = self.rng.random()
        if k < 0.4:
            n = self.rng.randint(1, 3) * self.cluster
        elif k < 0.6:
            n = self.rng.randint(1, 16) * 512
        else:
            n = self.rng.randint(1, 2 * self.cluster)
        return off, min(n, size - off)

    def rand_size(self) -> int:
        """A new virtual size: a multiple of 512, grow or shrink"""
        lo, hi = max(self.cluster, 64 * KB) // 512, 2 * self.size0 // 512
        k = self.rng.random()
        if k < 0.5:
            return self.rng.randint(lo, hi) * 512
        c = self.cluster // 512
        return max(lo, self.rng.randint(lo, hi) // c * c) * 512

    def choose(self, ops: List[Tuple[str, int]]) -> str:
        """A weighted choice; self.weights (ADD_COW_OPS_WEIGHTS) overrides
        weights, e.g. to leave a kind out while looking at another"""
        ops = [(o, self.weights.get(o, w) if w else 0) for o, w in ops]
        return self.rng.choices([o for o, _ in ops],
                                [w for _, w in ops])[0]

    def next_pattern(self) -> int:
        self.pattern = self.pattern % 255 + 1
        return self.pattern

    # -- online operations ---------------------------------------------------

    def node_of(self, side: Side, name: str) -> str:
        for node, f in self.online_chain(side):
            if f == name:
                return node
        raise OpFailed(f'no node for {name}')

    def op_online(self) -> None:
        chain = self.Q.chain
        n = len(chain)
        # Once a header names no backing file while one is attached, QEMU
        # describes the nodes above as json: file names, and a stream,
        # intermediate commit or snapshot stores such a name as a backing
        # file name, which qemu-img may refuse to open (both formats): not
        # before the next open
        names = 0 if self.mismatch else 1
        ops = [('write', 30), ('zero', 10), ('zero-unmap', 10),
               ('discard', 10), ('flush', 4), ('reopen', 4),
               ('change-backing-file', 4 if n > 1 else 1),
               ('block-stream', 3 * names if n > 1 else 0),
               ('block-commit', 2 * names if n > 2 else 0),
               ('block-commit-active', 2 if n > 1 else 0),
               ('blockdev-snapshot-sync', 3 * names if n < 6 else 0),
               ('block_resize', 4), ('close', 6)]
        kind = self.choose(ops)
        getattr(self, 'on_' + kind.replace('-', '_'))(kind)

    def on_io(self, kind: str, cmd: str,
              loose: Optional[Tuple[int, int]] = None) -> None:
        self.apply(kind, f'qemu-io {cmd}',
                   lambda side: self.hmp_io(side, cmd), True, loose)

    def on_write(self, kind: str) -> None:
        off, n = self.rand_extent()
        self.on_io(kind, f'write -P 0x{self.next_pattern():02x} {off} {n}')

    def null_active(self) -> bool:
        """Whether the active layer runs without the backing file its
        header names: opened with backing: null, or named so by a json:
        backing file name of the layer above (json_null_nodes())"""
        return self.null_session or self.Q.chain[0] in self.null_nodes

    def on_zero(self, kind: str, flags: str = '') -> None:
        off, n = self.rand_extent()
        if len(self.Q.chain) == 1 and not self.null_active():
            # no backing file: zeros may stay unallocated clusters
            self.mark_loose(self.Q.chain[0], off, off + n)
        self.on_io(kind, f'write -z {flags}{off} {n}')

    def on_zero_unmap(self, kind: str) -> None:
        self.on_zero(kind, '-u ')

    def on_discard(self, kind: str) -> None:
        off, n = self.rand_extent()
        self.mark_loose(self.Q.chain[0], off, off + n)
        if self.null_active():
            # qcow2 leaves an unallocated cluster alone, add-cow (whose
            # header names a backing file) makes it read zeros: told apart
            # once the layer is read with its backing file (at the close)
            self.null_discards.setdefault(self.Q.chain[0], []).append(
                (off, off + n))
        self.on_io(kind, f'discard {off} {n}', (off, off + n))

    def on_flush(self, kind: str) -> None:
        self.on_io(kind, 'flush')

    def on_reopen(self, kind: str) -> None:
        ro = self.rng.random() < 0.5
        self.apply(kind, f'blockdev-reopen read-only={ro}',
                   lambda side: self.reopen(side, ro), True)

    def on_change_backing_file(self, kind: str) -> None:
        chain = self.Q.chain
        # mostly a layer that has a backing file; the bottom one now and
        # then, which both formats must refuse
        if len(chain) > 1 and self.rng.random() < 0.85:
            i = self.rng.randrange(0, len(chain) - 1)
        else:
            i = self.rng.randrange(0, len(chain))
        layer = chain[i]
        k = self.rng.random()
        # QMP change-backing-file stores the format of the image itself as
        # the backing format (QEMU 10.2 blockdev.c, for every format): a
        # name is only kept where that is right, the empty name anywhere
        if i + 1 >= len(chain) or chain[i + 1].startswith('base.') or \
                k < 0.4:
            how = ''
        elif k < 0.7:
            how = 'relative'
        else:
            how = 'absolute'

        def run(side: Side) -> None:
            name = {'': '', 'relative': chain[i + 1] if how else '',
                    'absolute': side.path(chain[i + 1]) if how else ''}[how]
            self.qmp_ok(side, 'change-backing-file',
                        device=self.active_node(side),
                        **{'image-node-name': self.node_of(side, layer),
                           'backing-file': name})
        if not how:
            self.mismatch = True
        self.apply(kind, f'change-backing-file {layer} -> '
                   f'{how and chain[i + 1] + " (" + how + ")" or chr(34) * 2}',
                   run, True)

    def on_block_stream(self, kind: str) -> None:
        chain = self.Q.chain
        t = self.rng.randrange(0, len(chain) - 1)
        b = None
        if self.rng.random() < 0.6:
            b = self.rng.randrange(t + 1, len(chain))
        bf = None
        if b is not None and self.rng.random() < 0.3:
            bf = self.rng.choice(['', chain[b]])

        def run(side: Side) -> None:
            args = {'job-id': 'job', 'device': self.node_of(side, chain[t])}
            if b is not None:
                args['base-node'] = self.node_of(side, chain[b])
            if bf is not None:
                args['backing-file'] = bf
            self.qmp_ok(side, 'block-stream', **args)
            self.wait_job(side, 'job', False)
        self.move_loose(chain[t + 1:b], chain[t])
        if bf == '':
            self.mismatch = True
        self.apply(kind, f'block-stream into {chain[t]}'
                   + (f' base-node {chain[b]}' if b is not None else '')
                   + (f' backing-file "{bf}"' if bf is not None else ''),
                   run, True)

    def on_block_commit(self, kind: str) -> None:
        chain = self.Q.chain
        t = self.rng.randrange(1, len(chain) - 1)
        b = self.rng.randrange(t + 1, len(chain))
        bf = None
        if self.rng.random() < 0.3:
            bf = self.rng.choice(['', chain[b]])

        def run(side: Side) -> None:
            args = {'job-id': 'job', 'device': self.active_node(side),
                    'top-node': self.node_of(side, chain[t]),
                    'base-node': self.node_of(side, chain[b])}
            if bf is not None:
                args['backing-file'] = bf
            self.qmp_ok(side, 'block-commit', **args)
            self.wait_job(side, 'job', False)
        self.move_loose(chain[t:b], chain[b])
        if bf == '':
            self.mismatch = True
        self.apply(kind, f'block-commit {chain[t]} into {chain[b]}'
                   + (f' backing-file "{bf}"' if bf is not None else ''),
                   run, True)

    def on_block_commit_active(self, kind: str) -> None:
        chain = self.Q.chain
        b = self.rng.randrange(1, len(chain))

        def run(side: Side) -> None:
            base = self.node_of(side, chain[b])
            self.qmp_ok(side, 'block-commit', **{'job-id': 'job',
                                                 'device': self.active_node(
                                                     side),
                                                 'base-node': base})
            self.wait_job(side, 'job', True)
            self.active = chain[b]
            # The node added at open, if it was the active layer, is out
            # of the chain now: let it go
            if f'{side.key}top' not in [n for n, _ in
                                        self.online_chain(side)]:
                self.qmp(side, 'blockdev-del', **{'node-name':
                                                  f'{side.key}top'})
        self.move_loose(chain[:b], chain[b])
        self.apply(kind, f'block-commit (active) {chain[0]} into {chain[b]}',
                   run, True)

    def on_blockdev_snapshot_sync(self, kind: str) -> None:
        self.snap += 1
        name = f'S{self.snap}.ov'
        self.files.append(name)

        def run(side: Side) -> None:
            node = f'snap{self.snap}'
            self.qmp_ok(side, 'blockdev-snapshot-sync',
                        **{'node-name': self.active_node(side),
                           'snapshot-file': side.path(name),
                           'snapshot-node-name': node,
                           'format': side.fmt})
            self.active = name
        self.apply(kind, f'blockdev-snapshot-sync {name}', run, True)

    def on_block_resize(self, kind: str) -> None:
        size = self.rand_size()

        def run(side: Side) -> None:
            self.qmp_ok(side, 'block_resize',
                        **{'node-name': self.active_node(side),
                           'size': size})
        self.apply(kind, f'block_resize {self.size} -> {size}', run, True,
                   grown=(self.Q.chain[0], self.size))

    def on_close(self, kind: str) -> None:
        rebased = self.null_discards or None
        self.null_discards = {}
        self.null_session = False
        self.null_nodes = []
        # an allocated cluster must read zeros in both: add-cow reading the
        # backing data there is issue 11's defect 4
        self.apply(kind, 'close (quit QEMU)', self.shutdown, False,
                   rebased=rebased, one_way=True)
        self.online = False

    # -- offline operations ---------------------------------------------------

    def op_offline(self) -> None:
        chain = self.Q.chain
        n = len(chain)
        ops = [('open', 10), ('open-backing-null', 1),
               ('rebase', 4 if n > 1 else 1), ('rebase-u', 4),
               ('qemu-img-commit', 4 if n > 1 else 0), ('amend', 3),
               ('qemu-img-resize', 2)]
        kind = self.choose(ops)
        getattr(self, 'off_' + kind.replace('-', '_'))(kind)

    def off_open(self, kind: str, null_backing: bool = False) -> None:
        self.null_session = null_backing
        self.null_nodes = [] if null_backing else self.json_null_nodes()
        self.mismatch = False
        self.apply(kind, 'open' + (' with backing: null' if null_backing
                                   else ''),
                   lambda side: self.launch(side, null_backing), True)
        # (an open that failed in both chains leaves them closed)
        self.online = self.Q.vm is not None

    def off_open_backing_null(self, kind: str) -> None:
        self.off_open(kind, True)

    def overlay_layers(self) -> List[int]:
        """Indexes of the layers that are not the base file"""
        return [i for i, f in enumerate(self.Q.chain)
                if not f.startswith('base.')]

    def backing_candidates(self, layer: str) -> List[str]:
        """Files that may become @layer's backing file without a loop"""
        out = []
        for f in self.files:
            if f == layer:
                continue
            rc, info = self.tools.img('info', '--backing-chain', '-U',
                                      '--output=json', '-f',
                                      self.Q.fmt_of(f), self.Q.path(f))
            if rc != 0:
                continue
            if layer not in [file_name(i['filename'])
                             for i in json.loads(info)]:
                out.append(f)
        return out

    def do_rebase(self, kind: str, unsafe: bool) -> None:
        layers = self.overlay_layers()
        if not layers:
            return
        layer = self.Q.chain[self.rng.choice(layers)]
        cands = self.backing_candidates(layer)
        target = ''
        if cands and self.rng.random() < 0.7:
            target = self.rng.choice(cands)
        absolute = self.rng.random() < 0.5

        def run(side: Side) -> None:
            args = ['rebase', '-f', side.fmt]
            if unsafe:
                args.append('-u')
            if target:
                args += ['-b', side.path(target) if absolute else target,
                         '-F', side.fmt_of(target)]
            else:
                args += ['-b', '']
            rc, out = self.tools.img(*args, side.path(layer))
            if rc != 0:
                raise OpFailed(out.strip())
        i = self.Q.chain.index(layer)
        old = self.Q.chain[i + 1] if i + 1 < len(self.Q.chain) else ''
        self.apply(kind, f'qemu-img rebase{" -u" if unsafe else ""} '
                   f'{layer} -> '
                   + (f'{target}{" (absolute)" if absolute else ""}'
                      if target else '""'), run, False,
                   rebased={layer: self.loose.get(layer, [])}
                   if unsafe and target and target != old else None)

    def off_rebase(self, kind: str) -> None:
        self.do_rebase(kind, False)

    def off_rebase_u(self, kind: str) -> None:
        self.do_rebase(kind, True)

    def off_qemu_img_commit(self, kind: str) -> None:
        chain = self.Q.chain
        i = self.rng.randrange(0, len(chain) - 1)
        k = self.rng.random()
        b = None
        if k < 0.3 and i + 2 < len(chain):
            b = self.rng.randrange(i + 2, len(chain))
        drop = k > 0.7

        def run(side: Side) -> None:
            args = ['commit', '-f', side.fmt_of(chain[i])]
            if b is not None:
                args += ['-b', side.path(chain[b])]
            if drop:
                args.append('-d')
            rc, out = self.tools.img(*args, side.path(chain[i]))
            if rc != 0:
                raise OpFailed(out.strip())
        self.move_loose(chain[i:b if b is not None else i + 1],
                        chain[b if b is not None else i + 1])
        self.apply(kind, f'qemu-img commit {chain[i]}'
                   + (f' -b {chain[b]}' if b is not None else '')
                   + (' -d' if drop else ''), run, False)

    def off_amend(self, kind: str) -> None:
        chain = self.Q.chain
        layers = [i for i in self.overlay_layers()]
        if not layers:
            return
        i = self.rng.choice(layers)
        layer = chain[i]
        k = self.rng.random()
        if k < 0.3 and i + 1 < len(chain):
            what = 'backing_fmt'
        elif k < 0.55:
            what = 'image_file'
        elif k < 0.85:
            # add-cow refuses while there is a backing file (LEGIT_REFUSALS)
            what = 'image_file_raw'
        else:
            what = 'cluster_size'

        def run(side: Side) -> None:
            path = side.path(layer)
            args = ['amend', '-f', side.fmt]
            if what == 'backing_fmt':
                args += ['-o', f'backing_fmt={side.fmt_of(chain[i + 1])}']
            elif what == 'cluster_size':
                args += ['-o', 'cluster_size=1024']
            elif side.fmt == 'qcow2':
                # no qcow2 counterpart: an option that keeps the content
                lazy = 'on' if self.rng_side.random() < 0.5 else 'off'
                args += ['-o', f'lazy_refcounts={lazy}']
            elif what == 'image_file_raw':
                args += ['-o', 'image_file_raw=on']
            else:
                # The user renames the image file and says so
                old = self.image_file_of(side, layer)
                new = f'{layer}.{self.snap}-{self.steps}.img'
                os.link(old, side.path(new))
                args += ['-o', f'image_file={new}']
                rc, out = self.tools.img(*args, path)
                if rc != 0:
                    os.unlink(side.path(new))
                    raise OpFailed(out.strip())
                os.unlink(old)
                return
            rc, out = self.tools.img(*args, path)
            if rc != 0:
                raise OpFailed(out.strip())
            if what == 'image_file_raw' and side.fmt == 'qcow2' and \
                    i + 1 == len(chain):
                # add-cow allocates every unallocated cluster, with zeros:
                # so does qcow2 (zero clusters), else a backing file given
                # later would show through in qcow2 only
                self.zero_unallocated(side, layer)
        self.apply(kind, f'qemu-img amend {layer} ({what})', run, False)

    def zero_unallocated(self, side: Side, layer: str) -> None:
        """A zero write over every unallocated cluster of @layer (which
        has no backing file)"""
        path = side.path(layer)
        rc, out = self.tools.img('map', '--output=json', '-f',
                                 side.fmt_of(layer), path)
        if rc != 0:
            raise OpFailed(f'qemu-img map: {out.strip()}')
        cmds = [f'write -z {e["start"]} {e["length"]}'
                for e in json.loads(out) if not e['present']]
        if cmds:
            rc, out = self.tools.io(side.fmt_of(layer), path, *cmds)
            if rc != 0 or io_failed(out):
                raise OpFailed(f'qemu-io: {out.strip()}')

    def image_file_of(self, side: Side, layer: str) -> str:
        rc, out = self.tools.img('info', '-U', '--output=json', '-f',
                                 side.fmt, side.path(layer))
        if rc != 0:
            raise OpFailed(out.strip())
        data = json.loads(out)['format-specific']['data']
        name = data['image-file']
        return name if os.path.isabs(name) else side.path(name)

    def off_qemu_img_resize(self, kind: str) -> None:
        size = self.rand_size()
        layer = self.Q.chain[0]

        def run(side: Side) -> None:
            rc, out = self.tools.img('resize', '-f', side.fmt_of(layer),
                                     '--shrink', side.path(layer),
                                     str(size))
            if rc != 0:
                raise OpFailed(out.strip())
        self.apply(kind, f'qemu-img resize {layer} {self.size} -> {size}',
                   run, False, grown=(layer, self.size))

    # -- one sequence ---------------------------------------------------------

    def setup(self) -> None:
        rng = self.rng
        self.cluster = rng.choice([512, 4 * KB, 64 * KB])
        self.size0 = self.size = rng.choice([1, 2]) * MB + \
            rng.choice([0, 0, 512, 3 * 512, 37 * KB])
        base_fmt = rng.choice(['raw', 'qcow2'])
        base = f'base.{base_fmt}'
        base_size = self.size + rng.choice([0, 0, -64 * KB, 64 * KB,
                                            -3 * 512])
        base_cmds = []
        for _ in range(rng.randint(2, 6)):
            off = rng.randrange(0, base_size // 512) * 512
            n = min(rng.randint(1, 256) * 512, base_size - off)
            base_cmds.append(f'write -P 0x{self.next_pattern():02x} '
                             f'{off} {n}')
        layer_cmds = []
        for _ in range(2):
            cmds = []
            for _ in range(rng.randint(1, 5)):
                off, n = self.rand_extent()
                cmds.append(f'write -P 0x{self.next_pattern():02x} {off} {n}')
            layer_cmds.append(cmds)
        self.files = [base, 'L1.ov', 'L2.ov']
        self.active = 'L2.ov'
        self.vlog(f'  cluster size {self.cluster}, size {self.size}, '
                  f'{base} of {base_size} bytes')

        def run(side: Side) -> None:
            os.makedirs(side.dir)
            for cmd in (['create', '-f', base_fmt, side.path(base),
                         str(base_size)],
                        ['create', '-f', side.fmt, '-o',
                         f'cluster_size={self.cluster}', '-b', base, '-F',
                         base_fmt, side.path('L1.ov'), str(self.size)],
                        ['create', '-f', side.fmt, '-o',
                         f'cluster_size={self.cluster}', '-b', 'L1.ov', '-F',
                         side.fmt, side.path('L2.ov'), str(self.size)]):
                rc, out = self.tools.img(*cmd)
                if rc != 0:
                    raise OpFailed(out.strip())
            for name, fmt, cmds in ((base, base_fmt, base_cmds),
                                    ('L1.ov', side.fmt, layer_cmds[0]),
                                    ('L2.ov', side.fmt, layer_cmds[1])):
                rc, out = self.tools.io(fmt, side.path(name), *cmds)
                if rc != 0 or io_failed(out):
                    raise OpFailed(out.strip())
        self.apply('create', f'create: cluster size {self.cluster}, size '
                   f'{self.size}, {base} of {base_size} bytes; writes '
                   f'{base_cmds} {layer_cmds}', run, False)

    def run_sequence(self, seed: int, nsteps: int) -> bool:
        """One sequence; False on a divergence"""
        self.seed = seed
        self.rng = random.Random(seed)
        # side-specific choices (e.g. which qcow2 option amend toggles)
        # must not shift the shared sequence
        self.rng_side = random.Random(seed ^ 0x5a5a)
        self.pattern = 0
        self.snap = 0
        self.history: List[str] = []
        self.loose: Dict[str, List[Tuple[int, int]]] = {}
        self.null_session = False
        self.null_discards: Dict[str, List[Tuple[int, int]]] = {}
        self.null_nodes: List[str] = []
        self.ghosts: Dict[str, bytes] = {}
        self.mismatch = False
        self.online = False
        root = tempfile.mkdtemp(prefix=f'seq-{seed}-', dir=self.workdir)
        self.Q = Side('Q', 'qcow2', root)
        self.A = Side('A', 'add-cow', root)
        self.sides = (self.Q, self.A)
        self.sequences += 1
        self.vlog(f'sequence seed={seed}')
        ok = True
        try:
            self.setup()
            for _ in range(nsteps):
                if self.online:
                    self.op_online()
                else:
                    self.op_offline()
            if self.online:
                self.on_close('close')
        except Divergence as e:
            ok = False
            self.report(seed, str(e))
        except Refusal:
            pass
        except (OpFailed, Crash) as e:
            ok = False
            self.report(seed, f'unexpected failure outside an operation: '
                        f'{e}')
        finally:
            for side in self.sides:
                if side.vm is not None:
                    try:
                        side.vm.kill()
                    except Exception:  # pylint: disable=broad-except
                        pass
                    side.vm = None
        if ok:
            shutil.rmtree(root, ignore_errors=True)
        if self.progress:
            self.progress(f'sequence {self.sequences} seed={seed}: '
                          f'{"ok" if ok else "DIVERGED"} after '
                          f'{len(self.history)} operations')
        return ok

    def report(self, seed: int, msg: str) -> None:
        lines = [f'DIVERGENCE seed={seed} at step {len(self.history)}: '
                 f'{self.history[-1] if self.history else "?"}',
                 f'  {msg}',
                 f'  replay: ADD_COW_OPS_SEED={seed} '
                 f'ADD_COW_OPS_STEPS={self.nsteps}',
                 '  operations:']
        lines += [f'    {i + 1}. {h}' for i, h in enumerate(self.history)]
        text = '\n'.join(lines)
        self.divergences.append(text)
        self.log(text)

    def run(self, seeds: Iterable[int], nsteps: int,
            deadline: Optional[float] = None,
            until_divergence: bool = False) -> bool:
        """Run the sequences of @seeds (until @deadline); False if any
        diverged"""
        self.nsteps = nsteps
        ok = True
        for seed in seeds:
            if deadline is not None and time.monotonic() > deadline:
                break
            ok = self.run_sequence(seed, nsteps) and ok
            if until_divergence and not ok:
                break
        return ok

    def figures(self) -> List[str]:
        out = [f'sequences run: {self.sequences}, operations applied: '
               f'{sum(self.applied.values())}, divergences: '
               f'{len(self.divergences)}']
        for kind in sorted(self.applied):
            res = ', '.join(f'{o} {c}' for (k, o), c in
                            sorted(self.outcomes.items()) if k == kind)
            out.append(f'  {kind}: {self.applied[kind]}'
                       + (f' ({res})' if res else ''))
        for r, n in sorted(Counter(self.refusals).items()):
            out.append(f'  refused by add-cow as expected ({n}x): {r}')
        for n, (count, seed) in sorted(self.notes.items()):
            out.append(f'  note ({count}x, first in seed {seed}): {n}')
        return out


def seeds_for(base_seed: int, count: int) -> Iterable[int]:
    """The seeds of the sequences of a run (lazily: a timed run asks for
    an unbounded number)"""
    return (base_seed * 1000003 + i for i in range(count))


def main() -> int:
    import argparse  # pylint: disable=import-outside-toplevel
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(
        description='add-cow differential operation-sequence tester')
    ap.add_argument('--build', default=os.path.join(here,
                                                    '../../../.build/build'))
    ap.add_argument('--python', default=os.path.join(
        here, '../../../.build/qemu/python'),
        help='QEMU python directory (qemu.machine)')
    ap.add_argument('--sequences', type=int, default=int(
        os.environ.get('ADD_COW_OPS_SEQUENCES', '0') or 0))
    ap.add_argument('--minutes', type=float, default=float(
        os.environ.get('ADD_COW_OPS_MINUTES', '0') or 0))
    ap.add_argument('--seed', type=int, default=int(
        os.environ.get('ADD_COW_OPS_BASE_SEED', '1')))
    ap.add_argument('--replay', type=int, default=int(
        os.environ.get('ADD_COW_OPS_SEED', '-1')))
    ap.add_argument('--steps', type=int, default=int(
        os.environ.get('ADD_COW_OPS_STEPS', '40')))
    ap.add_argument('--workdir', default='')
    ap.add_argument('--until-divergence', action='store_true',
                    help='negative control: stop at the first divergence, '
                    'succeed only if there is one')
    ap.add_argument('-v', '--verbose', action='store_true')
    a = ap.parse_args()
    sys.path.insert(0, os.path.abspath(a.python))
    workdir = a.workdir or tempfile.mkdtemp(prefix='add-cow-ops.')
    os.makedirs(workdir, exist_ok=True)
    # Private copies: a concurrent rebuild must not swap the tools mid-run
    progs = []
    for var, prog in (('QEMU_IMG_PROG', 'qemu-img'),
                      ('QEMU_IO_PROG', 'qemu-io'),
                      ('QEMU_PROG', 'qemu-system-x86_64')):
        src = os.environ.get(var, os.path.join(a.build, prog))
        dst = os.path.join(workdir, prog)
        shutil.copy2(src, dst)
        progs.append(dst)
    bundle = os.path.join(os.path.dirname(os.environ.get(
        'QEMU_PROG', os.path.join(a.build, 'x'))), 'qemu-bundle')
    if os.path.exists(bundle):
        os.symlink(os.path.abspath(bundle),
                   os.path.join(workdir, 'qemu-bundle'))
    tester = OpsTester(Tools(*progs, sock_dir=workdir), workdir,
                       verbose=a.verbose or a.replay >= 0,
                       progress=lambda line: print(line, flush=True))
    t0 = time.monotonic()
    if a.replay >= 0:
        ok = tester.run([a.replay], a.steps)
    else:
        count = a.sequences or (10 ** 9 if a.minutes else 20)
        deadline = t0 + a.minutes * 60 if a.minutes else None
        ok = tester.run(seeds_for(a.seed, count), a.steps, deadline,
                        a.until_divergence)
    for line in tester.figures():
        print(line)
    if a.until_divergence:
        ok = not ok
        verdict = ('divergence found as expected' if ok else
                   'FAIL: no divergence found')
    else:
        verdict = 'PASS' if ok else 'FAIL'
    print(f'runtime {time.monotonic() - t0:.0f}s; {verdict}')
    if not a.workdir and not tester.divergences:
        shutil.rmtree(workdir, ignore_errors=True)
    elif tester.divergences:
        print(f'the images of the diverged sequences are in {workdir}')
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
