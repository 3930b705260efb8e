#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
#
# End-to-end tests of add-cow with a real Linux guest (issue 8).
#
# A tiny guest (Debian kernel + busybox initramfs, scripts/guest/
# build-guest.sh) boots under TCG from -kernel/-initrd with a virtio-blk
# disk that is an add-cow overlay over a shared base image (ext4 made with
# mkfs.ext4 -d plus a raw area of known sectors).  The guest runs the
# scenario named on its kernel command line (scripts/guest/init) and
# prints "GUEST-VERDICT: PASS|FAIL ..." on the serial console; the host
# checks images with qemu-img / qemu-io / e2fsck / debugfs and the
# independent reader tests/qemu-iotests/tests/add_cow_reader.py (no loop
# devices; root is not needed).
#
# Scenarios:
#   write    boot, verify base, write files and raw sectors (partial, full,
#            overlapping clusters), sync, poweroff; host checks; reboot and
#            the guest sees the data
#   crash    the guest writes and fsyncs numbered records; QEMU is killed
#            with SIGKILL; every reported record survives, qemu-img check
#            and e2fsck are clean
#   stream   block-stream over QMP while the guest writes; afterwards the
#            image file alone boots as format=raw
#   stream-crash
#            SIGKILL in the middle of block-stream; the image is consistent,
#            qemu-img rebase -b "" finishes the copy, the image file boots
#   remote   the base is served by qemu-storage-daemon over NBD (UNIX
#            socket) to two VMs at once; the overlays use it as their
#            backing file; boot, write, reboot with the image file behind
#            NBD as well
#
# --quick runs write and crash (part of "make check").
#
# Usage: check-system.py [--quick] [--format add-cow|qcow2]
#                        [--scenario NAME]... [--records N] [--keep] [-v]

import argparse
import fcntl
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(os.path.dirname(HERE))

SECTOR = 512
DISK_SECTORS = 131072           # 64 MiB
FS_SECTORS = 98304              # ext4 in the first 48 MiB
RAW_START = FS_SECTORS * SECTOR
REC_BASE = FS_SECTORS + 16384
REC_STRIDE = 37
REC_SECTORS = 5

# Must match WRITES in scripts/guest/init: tag, sector in raw area, count
WRITES = [("w1", 0, 1), ("w2", 7, 3), ("w3", 128, 128), ("w4", 300, 300),
          ("w5", 1024, 1024), ("w6", 129, 2), ("w7", 2100, 1),
          ("w8", 2175, 2), ("w9", 16000, 64), ("w10", 32767, 1)]

READER = os.path.join(TOP, "tests", "qemu-iotests", "tests",
                      "add_cow_reader.py")
# qemu-io writes between the two boots of "write": pattern byte (None: write
# -z), byte offset in the raw area, length.  None of them touch WRITES.
HOST_WRITES = [(0x5a, 2200 * SECTOR + 100, 3000),
               (0xa5, 20000 * SECTOR + 7, 70000),
               (None, 24064 * SECTOR, 69632)]

BOOT_TIMEOUT = float(os.environ.get("CHECK_SYSTEM_TIMEOUT", "300"))


class Failure(Exception):
    pass


# Every QEMU / qemu-storage-daemon started; killed when a scenario ends.
CHILDREN = []


def reap_children():
    for p in CHILDREN:
        if p.poll() is None:
            p.kill()
            p.wait()
    CHILDREN.clear()


def gen(tag, length):
    """Same bytes as gen() in scripts/guest/init."""
    return sectors(tag, 0, (length + SECTOR - 1) // SECTOR)[:length]


def sectors(tag, start, count):
    """Same bytes as sectors() in scripts/guest/init."""
    return b"".join(("%s %d" % (tag, start + i)).ljust(511).encode() + b"\n"
                    for i in range(count))


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rec_len(i):
    return 6000 + (i % 7) * 1000


def rec_sector(i):
    return REC_BASE + i * REC_STRIDE


class Env:
    def __init__(self, args):
        self.args = args
        self.fmt = args.format
        build = os.environ.get("QEMU_BUILD", os.path.join(TOP, ".build",
                                                          "build"))
        self.build = build
        self.qemu = os.path.join(build, "qemu-system-x86_64")
        self.qemu_img = os.path.join(build, "qemu-img")
        self.qemu_io = os.path.join(build, "qemu-io")
        self.qsd = os.path.join(build, "storage-daemon", "qemu-storage-daemon")
        self.guest = os.environ.get("GUEST_DIR",
                                    os.path.join(TOP, ".build", "guest"))
        self.work = args.workdir or os.path.join(
            TOP, ".build", "check-system", args.selection)
        for tool in (self.qemu, self.qemu_img, self.qemu_io, self.qsd):
            if not os.access(tool, os.X_OK):
                raise Failure("missing %s (run scripts/build.sh)" % tool)
        self.verbose = args.verbose
        self.reader_checks = 0
        self.reader_warnings = []

    def path(self, name):
        return os.path.join(self.work, name)

    def log(self, msg):
        print("check-system: %s" % msg, flush=True)

    def run(self, cmd, check=True, **kw):
        if self.verbose:
            self.log("$ " + " ".join(cmd))
        p = subprocess.run(cmd, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, **kw)
        if check and p.returncode != 0:
            raise Failure("%s exited %d:\n%s"
                          % (" ".join(cmd), p.returncode, p.stdout))
        return p

    # ----------------------------------------------------------- images
    def overlay_name(self, name):
        return self.path("%s.%s" % (name, self.fmt))

    def image_file(self, overlay):
        """The raw image file of an add-cow overlay (default name)."""
        return overlay + ".img"

    def create_overlay(self, name, backing=None, backing_fmt="raw"):
        ov = self.overlay_name(name)
        for f in (ov, self.image_file(ov)):
            if os.path.exists(f):
                os.unlink(f)
        self.run([self.qemu_img, "create", "-q", "-f", self.fmt,
                  "-b", backing or self.path("base.raw"), "-F", backing_fmt,
                  ov])
        return ov

    def img_check(self, image, fmt=None):
        p = self.run([self.qemu_img, "check", "-f", fmt or self.fmt, image],
                     check=False)
        if p.returncode != 0:
            raise Failure("qemu-img check %s: exit %d\n%s"
                          % (image, p.returncode, p.stdout))
        lines = p.stdout.strip().splitlines()
        for line in lines:
            if line.startswith("No errors were found"):
                return "no errors"
        return lines[-1] if lines else ""

    def to_raw(self, image, out, fmt=None, backing_raw=None):
        """The guest disk as QEMU reads it (qemu-img convert).  For add-cow
        with a local raw backing file, the independent reader written from
        the spec (tests/qemu-iotests/tests/add_cow_reader.py) must produce
        the same bytes, and its --check must find no fatal error."""
        fmt = fmt or self.fmt
        self.run([self.qemu_img, "convert", "-f", fmt, "-O", "raw",
                  image, out])
        with open(out, "rb") as f:
            data = f.read()
        if fmt == "add-cow" and os.path.exists(READER):
            alt = out + ".reader"
            cmd = [sys.executable, READER, image, "--check", "--dump", alt]
            if backing_raw:
                cmd += ["--backing-raw", backing_raw]
            p = self.run(cmd, check=False)
            if p.returncode == 3:
                # Non-fatal inconsistencies (spec: "Consistency checks
                # (informational)"): reported, not a failure.
                for line in p.stdout.strip().splitlines():
                    if "warning:" in line:
                        self.log("  independent reader: " + line)
                        self.reader_warnings.append(line)
            elif p.returncode != 0:
                raise Failure("%s exited %d:\n%s"
                              % (" ".join(cmd), p.returncode, p.stdout))
            with open(alt, "rb") as f:
                same = f.read() == data
            os.unlink(alt)
            if not same:
                raise Failure("the independent add-cow reader and qemu-img "
                              "convert disagree on %s" % image)
            self.reader_checks += 1
        return data

    def allocated(self, image):
        """Bytes the overlay itself holds (qemu-img map, depth 0)."""
        p = self.run([self.qemu_img, "map", "--output=json", "-f", self.fmt,
                      image])
        return sum(e["length"] for e in json.loads(p.stdout)
                   if e["depth"] == 0 and e["data"])

    def info(self, image):
        p = self.run([self.qemu_img, "info", "--output=json", "-f", self.fmt,
                      image])
        return json.loads(p.stdout)

    def fs_check(self, disk_bytes, name, replay=False):
        """e2fsck the ext4 part of a raw disk copy; returns e2fsck's
        summary line.  With replay, the journal is replayed first (as the
        kernel would at mount) and only then is a full check required to be
        clean."""
        fs = self.path(name + ".ext4")
        with open(fs, "wb") as f:
            f.write(disk_bytes[:RAW_START])
        if replay:
            p = self.run(["e2fsck", "-E", "journal_only", "-y", fs],
                         check=False)
            if p.returncode not in (0, 1):
                raise Failure("journal replay failed (%d):\n%s"
                              % (p.returncode, p.stdout))
        p = self.run(["e2fsck", "-f", "-n", fs], check=False)
        if p.returncode != 0:
            raise Failure("e2fsck -fn %s: exit %d\n%s" % (name, p.returncode,
                                                          p.stdout))
        return fs, p.stdout.strip().splitlines()[-1]

    def debugfs_cat(self, fs, path):
        p = subprocess.run(["debugfs", "-R", "cat " + path, fs],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if p.returncode != 0 or b"File not found" in p.stderr:
            return None
        return p.stdout

    def debugfs_exists(self, fs, path):
        p = subprocess.run(["debugfs", "-R", "stat " + path, fs],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        return b"File not found" not in p.stderr and p.returncode == 0


class VM:
    """One guest run; the serial console is QEMU's stdio."""

    def __init__(self, env, name, drive_args, append, qmp=False):
        self.env = env
        self.name = name
        self.out = b""
        self.cond = threading.Condition()
        self.qmp_path = env.path(name + ".qmp") if qmp else None
        cmd = [env.qemu, "-nodefaults", "-no-user-config",
               "-machine", "pc", "-accel", "tcg", "-m", "256", "-smp", "1",
               "-display", "none", "-serial", "stdio", "-monitor", "none",
               "-no-reboot", "-kernel", os.path.join(env.guest, "vmlinuz"),
               "-initrd", os.path.join(env.guest, "initramfs.cpio"),
               "-append", "console=ttyS0 panic=-1 quiet loglevel=4 " + append]
        if qmp:
            if os.path.exists(self.qmp_path):
                os.unlink(self.qmp_path)
            cmd += ["-qmp", "unix:%s,server=on,wait=off" % self.qmp_path]
        cmd += drive_args
        self.cmd = cmd
        self.logf = open(env.path(name + ".serial"), "wb")
        self.errf = open(env.path(name + ".stderr"), "wb")
        if env.verbose:
            env.log("$ " + " ".join(cmd))
        self.t0 = time.time()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.errf)
        CHILDREN.append(self.proc)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.qmp = None

    def _read(self):
        fd = self.proc.stdout.fileno()
        while True:
            try:
                data = os.read(fd, 4096)
            except OSError:
                data = b""
            with self.cond:
                if not data:
                    self.eof = True
                    self.cond.notify_all()
                    return
                self.out += data
                self.logf.write(data)
                self.logf.flush()
                self.cond.notify_all()
            if self.env.verbose:
                sys.stdout.write(data.decode(errors="replace"))
                sys.stdout.flush()

    def text(self):
        with self.cond:
            return self.out.decode(errors="replace")

    def wait_for(self, regex, timeout=BOOT_TIMEOUT, start=0):
        """Wait for regex in the console output; return the match."""
        rx = re.compile(regex.encode(), re.M)
        deadline = time.time() + timeout
        with self.cond:
            while True:
                m = rx.search(self.out, start)
                if m:
                    return m
                if getattr(self, "eof", False):
                    raise Failure("%s: QEMU exited before /%s/ appeared\n%s"
                                  % (self.name, regex, self.tail()))
                left = deadline - time.time()
                if left <= 0:
                    raise Failure("%s: timeout waiting for /%s/\n%s"
                                  % (self.name, regex, self.tail()))
                self.cond.wait(min(left, 1.0))

    def tail(self, n=15):
        lines = self.out.decode(errors="replace").splitlines()[-n:]
        try:
            with open(self.env.path(self.name + ".stderr"), "r") as f:
                err = f.read().strip()
        except OSError:
            err = ""
        s = "  serial| " + "\n  serial| ".join(lines)
        if err:
            s += "\n  stderr| " + "\n  stderr| ".join(err.splitlines()[-10:])
        return s

    def send(self, line):
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def verdict(self, timeout=BOOT_TIMEOUT):
        m = self.wait_for(r"^GUEST-VERDICT: (\S+) (.*?)\r?\n", timeout)
        ok, rest = m.group(1).decode(), m.group(2).decode()
        self.wait_exit(60)
        if ok != "PASS":
            raise Failure("%s: guest says %s %s\n%s"
                          % (self.name, ok, rest, self.tail()))
        if self.proc.returncode != 0:
            raise Failure("%s: QEMU exit code %d\n%s"
                          % (self.name, self.proc.returncode, self.tail()))
        return rest

    def wait_exit(self, timeout):
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise Failure("%s: QEMU did not exit\n%s" % (self.name,
                                                         self.tail()))
        self.reader.join(5)
        self.close()

    def kill(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.reader.join(5)
        self.close()

    def close(self):
        if self.qmp:
            self.qmp.close()
            self.qmp = None
        self.logf.close()
        self.errf.close()

    def elapsed(self):
        return time.time() - self.t0

    # ---------------------------------------------------------------- QMP
    def qmp_connect(self):
        deadline = time.time() + 30
        while True:
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(self.qmp_path)
                break
            except OSError:
                s.close()
                if time.time() > deadline:
                    raise Failure("%s: cannot connect to QMP" % self.name)
                time.sleep(0.1)
        self.qmp = QMP(s)
        self.qmp.command("qmp_capabilities")


class QMP:
    def __init__(self, sock):
        self.sock = sock
        self.buf = b""
        self.events = []
        self._recv()                    # greeting

    def _recv(self, timeout=60):
        self.sock.settimeout(timeout)
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise Failure("QMP connection closed")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def command(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            r = self._recv()
            if "event" in r:
                self.events.append(r)
                continue
            if "error" in r:
                raise Failure("QMP %s: %s" % (name, r["error"]))
            return r.get("return")

    def event(self, name, timeout):
        deadline = time.time() + timeout
        while True:
            for i, e in enumerate(self.events):
                if e["event"] == name:
                    return self.events.pop(i)
            left = deadline - time.time()
            if left <= 0:
                raise Failure("QMP: no %s event" % name)
            try:
                r = self._recv(left)
            except socket.timeout:
                continue
            if "event" in r:
                self.events.append(r)

    def close(self):
        self.sock.close()


# ------------------------------------------------------------------ base
def make_base(env):
    """The shared base image: ext4 (mkfs.ext4 -d) + raw area of known
    sectors.  Returns (raw area bytes, expected file contents)."""
    stage = env.path("base-root")
    os.makedirs(os.path.join(stage, "data"), exist_ok=True)
    files = {
        "data/a.bin": gen("a", 300000),
        "data/b.txt": gen("b", 5000),
        "data/gone.bin": gen("gone", 100000),
        "data/big.bin": gen("bigbase", 4 << 20),
    }
    raw = sectors("base", FS_SECTORS, DISK_SECTORS - FS_SECTORS)
    for name, data in files.items():
        with open(os.path.join(stage, name), "wb") as f:
            f.write(data)
    with open(os.path.join(stage, "MANIFEST"), "w") as f:
        for name, data in sorted(files.items()):
            f.write("%s  %s\n" % (sha256(data), name))
    with open(os.path.join(stage, "RAWSHA"), "w") as f:
        f.write(sha256(raw) + "\n")
    fs = env.path("base.ext4")
    if os.path.exists(fs):
        os.unlink(fs)
    env.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-L", "acowbase",
             "-E", "root_owner=0:0", "-d", stage, fs, "48M"])
    with open(fs, "rb") as f:
        fsdata = f.read()
    assert len(fsdata) == RAW_START
    base = env.path("base.raw")
    if os.path.exists(base):
        os.chmod(base, 0o644)
    with open(base, "wb") as f:
        f.write(fsdata)
        f.write(raw)
    os.unlink(fs)
    os.chmod(base, 0o444)
    return raw, files


def expected_raw_after_writes(base_raw):
    raw = bytearray(base_raw)
    for tag, s, n in WRITES:
        off = s * SECTOR
        raw[off:off + n * SECTOR] = sectors(tag, FS_SECTORS + s, n)
    return bytes(raw)


def expected_raw_after_records(base_raw, n):
    raw = bytearray(base_raw)
    for i in range(1, n + 1):
        off = (rec_sector(i) - FS_SECTORS) * SECTOR
        raw[off:off + REC_SECTORS * SECTOR] = sectors("r%d" % i,
                                                      rec_sector(i),
                                                      REC_SECTORS)
    return bytes(raw)


def expected_files_after_write(files):
    a = bytearray(files["data/a.bin"])
    a[10000:15000] = gen("patch", 5000)
    return {
        "new/small.txt": gen("small", 100),
        "new/big.bin": gen("big", 3145728),
        "new/odd.bin": gen("odd", 70001),
        "data/a.bin": bytes(a),
        "data/b.txt": files["data/b.txt"] + gen("append", 3000),
        "data/big.bin": files["data/big.bin"],
    }


def first_diff(a, b):
    for i in range(0, min(len(a), len(b)), SECTOR):
        if a[i:i + SECTOR] != b[i:i + SECTOR]:
            return i
    return min(len(a), len(b)) if len(a) != len(b) else None


def drive(image, fmt, extra=""):
    return ["-drive", "file=%s,if=virtio,format=%s,cache=writeback%s"
            % (image, fmt, extra)]


# ------------------------------------------------------------- scenarios
def check_after_write(env, st, image, name, fmt=None):
    """Host-side checks after the write boot; returns a summary."""
    chk = env.img_check(image, fmt)
    disk = env.to_raw(image, env.path(name + ".converted.raw"), fmt,
                      backing_raw=env.path("base.raw"))
    want_raw = expected_raw_after_writes(st.base_raw)
    d = first_diff(disk[RAW_START:], want_raw)
    if d is not None:
        raise Failure("%s: raw area differs from the model at byte %d "
                      "(disk sector %d)" % (name, d, FS_SECTORS + d // SECTOR))
    fs, fsck = env.fs_check(disk, name)
    for path, data in expected_files_after_write(st.files).items():
        got = env.debugfs_cat(fs, "/" + path)
        if got != data:
            raise Failure("%s: /%s differs (%s bytes, want %d)"
                          % (name, path, None if got is None else len(got),
                             len(data)))
    if env.debugfs_exists(fs, "/data/gone.bin"):
        raise Failure("%s: deleted file still present" % name)
    os.unlink(fs)
    os.unlink(env.path(name + ".converted.raw"))
    return chk, fsck, sha256(want_raw)


def sc_write(env, st):
    ov = env.create_overlay("vm")
    vm = VM(env, "write-boot1", drive(ov, env.fmt), "acow_scenario=write")
    v1 = vm.verdict()
    t1 = vm.elapsed()
    chk, fsck, want = check_after_write(env, st, ov, "write")
    m = re.search(r"raw-sha=(\w+)", v1)
    if not m or m.group(1) != want:
        raise Failure("guest raw-sha %s != model %s" % (m and m.group(1),
                                                        want))
    alloc = env.allocated(ov)
    env.log("  boot 1: %s (%.1f s); qemu-img check: %s; e2fsck: %s; "
            "overlay holds %d KiB" % (v1, t1, chk, fsck, alloc >> 10))
    # Between the boots, unaligned writes and a zero write from qemu-io.
    raw = bytearray(expected_raw_after_writes(st.base_raw))
    cmds = []
    for pat, off, length in HOST_WRITES:
        if pat is None:
            cmds.append("write -z %d %d" % (RAW_START + off, length))
            raw[off:off + length] = bytes(length)
        else:
            cmds.append("write -P 0x%x %d %d" % (pat, RAW_START + off, length))
            raw[off:off + length] = bytes([pat]) * length
    for pat, off, length in HOST_WRITES:
        cmds.append("read -P 0x%x %d %d" % (pat or 0, RAW_START + off, length))
    argv = [env.qemu_io, "-f", env.fmt]
    for c in cmds:
        argv += ["-c", c]
    p = env.run(argv + [ov])
    if "Pattern verification failed" in p.stdout or "error" in p.stdout:
        raise Failure("qemu-io: %s" % p.stdout)
    chk = env.img_check(ov)
    disk = env.to_raw(ov, env.path("write.converted.raw"),
                      backing_raw=env.path("base.raw"))
    os.unlink(env.path("write.converted.raw"))
    if disk[RAW_START:] != bytes(raw):
        raise Failure("raw area differs after the qemu-io writes")
    want = sha256(bytes(raw))
    env.log("  qemu-io: %d writes (unaligned, partial clusters, write -z) "
            "read back; qemu-img check: %s" % (len(HOST_WRITES), chk))
    vm = VM(env, "write-boot2", drive(ov, env.fmt),
            "acow_scenario=verify acow_expect=" + want)
    v2 = vm.verdict()
    chk = env.img_check(ov)
    env.log("  boot 2: %s (%.1f s); qemu-img check: %s"
            % (v2, vm.elapsed(), chk))
    return "2 boots, data verified by host and guest"


def killed_records(vm):
    """SIGKILL QEMU; return the number of records the guest reported."""
    os.kill(vm.proc.pid, signal.SIGKILL)
    vm.proc.wait()
    vm.reader.join(5)
    vm.close()
    recs = [int(x) for x in re.findall(r"^REC (\d+)\r?\n", vm.text(), re.M)]
    n = max(recs)
    if sorted(recs) != list(range(1, n + 1)):
        raise Failure("record numbers on the console are not 1..%d" % n)
    return n


def check_after_crash(env, st, image, name, n, fmt=None):
    """After SIGKILL: the image is consistent, raw records 1..n are there
    and nothing else of the raw area changed except possibly record n + 1
    (in flight when killed); after a journal replay the file system is
    clean and holds record files 1..n."""
    chk = env.img_check(image, fmt)
    conv = env.path(name + ".converted.raw")
    disk = env.to_raw(image, conv, fmt, backing_raw=env.path("base.raw"))
    want = expected_raw_after_records(st.base_raw, n)
    got = bytearray(disk[RAW_START:])
    nxt = (rec_sector(n + 1) - FS_SECTORS) * SECTOR
    got[nxt:nxt + REC_SECTORS * SECTOR] = want[nxt:nxt + REC_SECTORS * SECTOR]
    d = first_diff(bytes(got), want)
    if d is not None:
        raise Failure("%s: raw area differs at disk sector %d"
                      % (name, FS_SECTORS + d // SECTOR))
    fs, fsck = env.fs_check(disk, name, replay=True)
    for i in range(1, n + 1):
        if env.debugfs_cat(fs, "/rec/%d" % i) != gen("rec%d" % i, rec_len(i)):
            raise Failure("%s: record file %d lost after journal replay"
                          % (name, i))
    os.unlink(fs)
    os.unlink(conv)
    return chk, fsck


def check_clean(env, image, name, fmt=None):
    """qemu-img check and e2fsck -fn after a clean guest shutdown."""
    chk = env.img_check(image, fmt) if fmt != "raw" else "-"
    conv = env.path(name + ".converted.raw")
    disk = env.to_raw(image, conv, fmt)
    fs, fsck = env.fs_check(disk, name)
    os.unlink(fs)
    os.unlink(conv)
    return chk, fsck


def sc_crash(env, st):
    target = env.args.records
    ov = env.create_overlay("crash")
    vm = VM(env, "crash-boot1", drive(ov, env.fmt), "acow_scenario=crash")
    start = vm.wait_for(r"^GUEST: .*CRASH-READY").end()
    vm.wait_for(r"^REC %d\r?\n" % target, start=start)
    n = killed_records(vm)
    env.log("  killed QEMU (SIGKILL) after %d fsynced records (%.1f s)"
            % (n, vm.elapsed()))
    chk, fsck = check_after_crash(env, st, ov, "crash", n)
    env.log("  after kill: qemu-img check: %s; journal replay + e2fsck: %s; "
            "%d records verified on the host" % (chk, fsck, n))
    vm = VM(env, "crash-boot2", drive(ov, env.fmt),
            "acow_scenario=crashcheck acow_n=%d" % n)
    v2 = vm.verdict()
    chk2, fsck2 = check_clean(env, ov, "crash2")
    env.log("  boot 2: %s (%.1f s); qemu-img check: %s; e2fsck: %s"
            % (v2, vm.elapsed(), chk2, fsck2))
    return "%d fsynced records survived SIGKILL" % n


def sc_stream_crash(env, st):
    """SIGKILL in the middle of block-stream while the guest writes; the
    half-streamed image is consistent, qemu-img rebase -b "" finishes the
    job offline and the image file then boots alone."""
    ov = env.create_overlay("scrash")
    vm = VM(env, "scrash-boot1",
            ["-drive", "file=%s,format=%s,if=none,id=disk0,cache=writeback"
             % (ov, env.fmt), "-device", "virtio-blk-pci,drive=disk0"],
            "acow_scenario=crash", qmp=True)
    vm.qmp_connect()
    start = vm.wait_for(r"^GUEST: .*CRASH-READY").end()
    vm.wait_for(r"^REC 3\r?\n", start=start)
    vm.qmp.command("block-stream", **{"job-id": "stream0", "device": "disk0",
                                      "speed": 4 << 20})
    deadline = time.time() + BOOT_TIMEOUT
    while True:
        jobs = vm.qmp.command("query-block-jobs")
        if not jobs:
            raise Failure("stream job ended before the kill")
        if jobs[0]["offset"] * 3 >= jobs[0]["len"]:
            break
        if time.time() > deadline:
            raise Failure("stream job too slow: %s" % jobs[0])
        time.sleep(0.2)
    done = jobs[0]["offset"]
    n = killed_records(vm)
    env.log("  killed QEMU (SIGKILL) with block-stream at %d of %d MiB, "
            "after %d fsynced records" % (done >> 20, jobs[0]["len"] >> 20, n))
    info = env.info(ov)
    if "backing-filename" not in info:
        raise Failure("backing file dropped by an unfinished stream")
    spec = info.get("format-specific", {}).get("data", {})
    chk, fsck = check_after_crash(env, st, ov, "scrash", n)
    env.log("  after kill: qemu-img check: %s; %s/%s clusters allocated; "
            "journal replay + e2fsck: %s; %d records verified on the host"
            % (chk, spec.get("allocated-clusters"),
               spec.get("total-clusters"), fsck, n))
    env.run([env.qemu_img, "rebase", "-f", env.fmt, "-b", "", ov])
    if env.fmt == "add-cow":
        # The image file becomes the whole disk on request only
        env.run([env.qemu_img, "amend", "-f", env.fmt, "-o",
                 "image_file_raw=on", ov])
    info = env.info(ov)
    if "backing-filename" in info:
        raise Failure("qemu-img rebase -b '' kept the backing file")
    spec = info.get("format-specific", {}).get("data", {})
    chk = env.img_check(ov)
    disk = env.to_raw(ov, env.path("scrash.rebased.raw"))
    os.unlink(env.path("scrash.rebased.raw"))
    env.log("  qemu-img rebase -b '': qemu-img check: %s; %s/%s clusters "
            "allocated, all-allocated=%s"
            % (chk, spec.get("allocated-clusters"),
               spec.get("total-clusters"), spec.get("all-allocated")))
    if env.fmt == "add-cow" and sha256_file(env.image_file(ov)) != \
            sha256(disk):
        raise Failure("after rebase the image file is not the whole disk")
    if env.fmt == "add-cow":
        image, ifmt = env.image_file(ov), "raw"
    else:
        image, ifmt = ov, env.fmt
    vm = VM(env, "scrash-boot2", drive(image, ifmt),
            "acow_scenario=crashcheck acow_n=%d" % n)
    v2 = vm.verdict()
    chk2, fsck2 = check_clean(env, image, "scrash2", ifmt)
    env.log("  boot 2 (%s alone, format=%s): %s "
            "(%.1f s); e2fsck: %s" % (os.path.basename(image), ifmt, v2,
                                      vm.elapsed(), fsck2))
    return "SIGKILL during block-stream, finished offline"


def sc_stream(env, st):
    ov = env.create_overlay("stream")
    vm = VM(env, "stream-boot1",
            ["-drive", "file=%s,format=%s,if=none,id=disk0,cache=writeback"
             % (ov, env.fmt), "-device", "virtio-blk-pci,drive=disk0"],
            "acow_scenario=stream", qmp=True)
    vm.qmp_connect()
    start = vm.wait_for(r"^GUEST: .*STREAM-READY").end()
    vm.wait_for(r"^REC 3\r?\n", start=start)
    speed = env.args.stream_speed << 20
    t0 = time.time()
    vm.qmp.command("block-stream", **{"job-id": "stream0", "device": "disk0",
                                      "speed": speed})
    recs_before = len(re.findall(r"^REC \d+", vm.text(), re.M))
    ev = vm.qmp.event("BLOCK_JOB_COMPLETED", BOOT_TIMEOUT)
    tjob = time.time() - t0
    data = ev["data"]
    if data.get("error") or data["offset"] != data["len"]:
        raise Failure("block-stream: %s" % data)
    recs_during = len(re.findall(r"^REC \d+", vm.text(), re.M)) - recs_before
    last = max(int(x) for x in re.findall(r"^REC (\d+)", vm.text(), re.M))
    vm.wait_for(r"^REC %d\r?\n" % (last + 2))
    vm.send("stop")
    v1 = vm.verdict()
    n = int(re.search(r"records=(\d+)", v1).group(1))
    env.log("  boot 1: %s (%.1f s); block-stream of %d MiB at %d MiB/s took "
            "%.1f s, %d records written meanwhile"
            % (v1, vm.elapsed(), data["len"] >> 20, speed >> 20, tjob,
               recs_during))
    if recs_during < 1:
        raise Failure("stream: the guest wrote nothing during the job")
    if env.fmt == "add-cow":
        env.run([env.qemu_img, "amend", "-f", env.fmt, "-o",
                 "image_file_raw=on", ov])
    chk = env.img_check(ov)
    info = env.info(ov)
    if "backing-filename" in info:
        raise Failure("stream: overlay still has a backing file: %s"
                      % info["backing-filename"])
    disk = env.to_raw(ov, env.path("stream.converted.raw"),
                      backing_raw=env.path("base.raw"))
    want_raw = expected_raw_after_records(st.base_raw, n)
    if disk[RAW_START:] != want_raw:
        raise Failure("stream: raw area differs from the model")
    if env.fmt == "add-cow":
        image = env.image_file(ov)
        if sha256_file(image) != sha256(disk):
            raise Failure("stream: the image file differs from the disk")
        os.unlink(env.path("stream.converted.raw"))
        spec = info.get("format-specific", {}).get("data", {})
        extra = " (all-allocated=%s, %s/%s clusters)" % (
            spec.get("all-allocated"), spec.get("allocated-clusters"),
            spec.get("total-clusters"))
    else:
        image = env.path("stream.converted.raw")
        extra = ""
    env.log("  after stream: qemu-img check: %s; no backing file%s; "
            "image file == converted disk" % (chk, extra))
    vm = VM(env, "stream-boot2", drive(image, "raw"),
            "acow_scenario=streamcheck acow_n=%d acow_expect=%s"
            % (n, sha256(want_raw)))
    v2 = vm.verdict()
    env.log("  boot 2 (%s alone, format=raw): %s (%.1f s)"
            % (os.path.basename(image), v2, vm.elapsed()))
    return "streamed while writing; image file boots alone"


class QSD:
    def __init__(self, env, name, args):
        self.sock = env.path(name + ".sock")
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        pidfile = env.path(name + ".pid")
        if os.path.exists(pidfile):
            os.unlink(pidfile)
        self.errf = open(env.path(name + ".log"), "wb")
        # The pid file is written once every option has been processed.
        cmd = [env.qsd, "--pidfile", pidfile, "--nbd-server",
               "addr.type=unix,addr.path=" + self.sock] + args
        if env.verbose:
            env.log("$ " + " ".join(cmd))
        self.proc = subprocess.Popen(cmd, stdout=self.errf,
                                     stderr=subprocess.STDOUT)
        CHILDREN.append(self.proc)
        deadline = time.time() + 30
        while not os.path.exists(pidfile):
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                with open(env.path(name + ".log")) as f:
                    raise Failure("qemu-storage-daemon failed: " + f.read())
            time.sleep(0.05)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.errf.close()


def sc_remote(env, st):
    base_qsd = QSD(env, "nbd-base", [
        "--blockdev", "driver=file,node-name=file0,filename=%s,read-only=on"
        % env.path("base.raw"),
        "--blockdev", "driver=raw,node-name=base0,file=file0,read-only=on",
        "--export", "type=nbd,id=exp0,node-name=base0,name=base,"
        "writable=off"])
    img_qsd = None
    try:
        url = "nbd+unix:///base?socket=%s" % base_qsd.sock
        # Two VMs at once on their own overlays over the one NBD export.
        ovs = [env.create_overlay(n, backing=url)
               for n in ("remote", "remote2")]
        vms = [VM(env, "%s-boot1" % os.path.basename(ov).split(".")[0],
                  drive(ov, env.fmt), "acow_scenario=write") for ov in ovs]
        for vm, ov in zip(vms, ovs):
            v1 = vm.verdict()
            t1 = vm.elapsed()
            name = os.path.basename(ov).split(".")[0]
            chk, fsck, want = check_after_write(env, st, ov, name)
            info = env.info(ov)
            env.log("  boot 1 of %s (backing %s): %s (%.1f s); qemu-img "
                    "check: %s; e2fsck: %s"
                    % (os.path.basename(ov), info.get("backing-filename"), v1,
                       t1, chk, fsck))
        ov = ovs[0]
        append = "acow_scenario=verify acow_expect=" + want
        hidden = None
        if env.fmt == "add-cow":
            # Serve the image file over NBD too and boot with it from there.
            img_qsd = QSD(env, "nbd-img", [
                "--blockdev", "driver=file,node-name=img0,filename=%s"
                % env.image_file(ov),
                "--export", "type=nbd,id=exp1,node-name=img0,name=img,"
                "writable=on"])
            # Hide the local file (the daemon keeps it open) so that the
            # guest can only reach it through NBD.
            hidden = env.image_file(ov) + ".served-by-nbd"
            os.rename(env.image_file(ov), hidden)
            args = ["-blockdev",
                    "driver=add-cow,node-name=top,cache.direct=off,"
                    "file.driver=file,file.filename=%s,"
                    "image-file.driver=nbd,image-file.server.type=unix,"
                    "image-file.server.path=%s,image-file.export=img"
                    % (ov, img_qsd.sock),
                    "-device", "virtio-blk-pci,drive=top"]
            where = "image file and base over NBD"
        else:
            args = drive(ov, env.fmt)
            where = "base over NBD"
        try:
            vm = VM(env, "remote-boot2", args, append)
            v2 = vm.verdict()
        finally:
            if hidden:
                os.rename(hidden, env.image_file(ov))
        env.log("  boot 2 (%s): %s (%.1f s)" % (where, v2, vm.elapsed()))
        if img_qsd:
            img_qsd.stop()
            img_qsd = None
        env.img_check(ov)
        return "golden base served by qemu-storage-daemon over NBD"
    finally:
        if img_qsd:
            img_qsd.stop()
        base_qsd.stop()


SCENARIOS = [("write", sc_write), ("crash", sc_crash), ("stream", sc_stream),
             ("stream-crash", sc_stream_crash), ("remote", sc_remote)]
QUICK = ["write", "crash"]


class State:
    pass


def main():
    ap = argparse.ArgumentParser(
        description="add-cow end-to-end tests with a real guest")
    ap.add_argument("--quick", action="store_true",
                    help="only the write+reboot and crash scenarios")
    ap.add_argument("--scenario", action="append",
                    choices=[n for n, _ in SCENARIOS])
    ap.add_argument("--format", default=os.environ.get("CHECK_SYSTEM_FORMAT",
                                                       "add-cow"))
    ap.add_argument("--records", type=int, default=None,
                    help="records before the kill (default 40, quick 25)")
    ap.add_argument("--stream-speed", type=int, default=8,
                    help="block-stream speed limit in MiB/s")
    ap.add_argument("--workdir")
    ap.add_argument("--keep", action="store_true",
                    help="keep the disk images even on success")
    ap.add_argument("--verbose", "-v", action="store_true")
    args = ap.parse_args()
    if args.records is None:
        args.records = 25 if args.quick else 40
    names = args.scenario or (QUICK if args.quick else
                              [n for n, _ in SCENARIOS])
    args.selection = ("quick" if args.quick and not args.scenario else
                      "all" if not args.scenario else "-".join(names))

    t_all = time.time()
    try:
        env = Env(args)
    except Failure as e:
        print("check-system: FAIL: %s" % e, flush=True)
        return 1
    subprocess.run(["bash", os.path.join(HERE, "build-guest.sh")],
                   check=True, env=dict(os.environ, GUEST_DIR=env.guest))
    os.makedirs(env.work, exist_ok=True)
    lock = open(os.path.join(env.work, ".lock"), "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    for f in os.listdir(env.work):
        p = os.path.join(env.work, f)
        if (os.path.isfile(p) or os.path.islink(p)) and f != ".lock":
            os.unlink(p)
    st = State()
    st.base_raw, st.files = make_base(env)
    base_sha = sha256_file(env.path("base.raw"))
    with open(os.path.join(env.guest, "kernel-version")) as f:
        kver = f.read().strip()
    env.log("format %s, guest kernel %s, base image %s (64 MiB, sha256 %s)"
            % (env.fmt, kver, env.path("base.raw"), base_sha[:16]))

    results = []
    for name in names:
        fn = dict(SCENARIOS)[name]
        t0 = time.time()
        env.log("[%s] ..." % name)
        try:
            msg = fn(env, st)
            if sha256_file(env.path("base.raw")) != base_sha:
                raise Failure("the base image changed")
            ok = True
        except (Failure, OSError) as e:
            msg, ok = str(e), False
        finally:
            reap_children()
        dt = time.time() - t0
        env.log("[%s] %s: %s (%.1f s)" % (name, "PASS" if ok else "FAIL",
                                          msg, dt))
        results.append(ok)
    passed = sum(results)
    env.log("%d/%d scenarios passed, base image unchanged: %s, "
            "independent reader agreed %d times (%d warnings), %.1f s total"
            % (passed, len(results),
               "yes" if sha256_file(env.path("base.raw")) == base_sha
               else "NO", env.reader_checks, len(env.reader_warnings),
               time.time() - t_all))
    if passed == len(results) and not args.keep:
        # Drop the disk images; logs and serial transcripts stay.
        for f in os.listdir(env.work):
            if re.search(r"\.(raw|img|ext4|%s)$" % re.escape(env.fmt), f):
                os.unlink(env.path(f))
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
