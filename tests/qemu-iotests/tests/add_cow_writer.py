#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Minimal add-cow writer and self-test for add_cow_reader.py
#
# Written from docs/specs/add-cow.txt alone.  It creates images and performs
# allocating writes (with the copy-on-write fill and the write ordering the
# spec requires) so that the independent reader can be tested without QEMU,
# and it crafts malformed headers to check the reader's validation.
#
# Usage:
#   add_cow_writer.py create FILE SIZE [--image-file NAME] [--backing NAME
#                     --backing-fmt FMT] [--cluster-bits N]
#   add_cow_writer.py write FILE OFFSET PATTERN LENGTH [--backing-raw FILE]
#   add_cow_writer.py selftest
#
# Copyright (c) 2026 The add-cow authors

"""Create and write add-cow images; self-test for add_cow_reader."""

import argparse
import functools
import os
import random
import struct
import sys
import tempfile
from typing import BinaryIO, Callable, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# pylint: disable=wrong-import-position
import add_cow_reader as reader  # noqa: E402


HEADER = struct.Struct('<4sIII QQQ QQQ IIII 16s16s16s')
DEFAULT_HEADER_SIZE = 16384


def bitmap_size(virtual_size: int, cluster_bits: int) -> int:
    """Bitmap size in bytes for a disk of virtual_size bytes."""
    cs = 1 << cluster_bits
    nb_clusters = (virtual_size + cs - 1) // cs
    return (((nb_clusters + 7) // 8) + 511) // 512 * 512


def make_header(virtual_size: int, image_name: bytes,
                backing_name: Optional[bytes] = None,
                backing_fmt: bytes = b'', image_fmt: bytes = b'raw',
                cluster_bits: int = 16,
                header_size: int = DEFAULT_HEADER_SIZE,
                autoclear: int = 0) -> bytes:
    """Return the header_size bytes of a valid header."""
    image_off = 128
    backing_off = image_off + len(image_name) if backing_name else 0
    fixed = HEADER.pack(
        b'ACOW', header_size, cluster_bits, 0,
        0, 0, autoclear,
        virtual_size, header_size, bitmap_size(virtual_size, cluster_bits),
        image_off, len(image_name), backing_off,
        len(backing_name) if backing_name else 0,
        image_fmt, backing_fmt if backing_name else b'', bytes(16))
    hdr = bytearray(header_size)
    hdr[:128] = fixed
    hdr[image_off:image_off + len(image_name)] = image_name
    if backing_name:
        hdr[backing_off:backing_off + len(backing_name)] = backing_name
    return bytes(hdr)


def create(path: str, virtual_size: int, image_file: Optional[str] = None,
           backing: Optional[str] = None, backing_fmt: str = 'raw',
           cluster_bits: int = 16) -> None:
    """Create an add-cow image and its image file (never shrunk)."""
    if image_file is None:
        image_file = os.path.basename(path) + '.img'
    hdr = make_header(virtual_size, os.fsencode(image_file),
                      os.fsencode(backing) if backing else None,
                      backing_fmt.encode() if backing else b'',
                      cluster_bits=cluster_bits)
    img_path = os.path.join(os.path.dirname(os.path.abspath(path)),
                            image_file)
    with open(img_path, 'ab') as f:
        if f.tell() < virtual_size:
            f.truncate(virtual_size)
    with open(path, 'wb') as f:
        f.write(hdr)
        f.write(bytes(bitmap_size(virtual_size, cluster_bits)))


class Writer:
    """Performs allocating writes on an add-cow image with a raw backing."""

    def __init__(self, path: str, backing_raw: Optional[str] = None):
        with open(path, 'rb') as f:
            fields = HEADER.unpack(f.read(128))
        self.path = path
        self.cluster_size = 1 << fields[2]
        self.virtual_size = fields[7]
        self.bitmap_offset = fields[8]
        base = os.path.dirname(os.path.abspath(path))
        with open(path, 'rb') as f:
            f.seek(fields[10])
            name = os.fsdecode(f.read(fields[11]))
            self.image = os.path.join(base, name)
            self.backing = backing_raw
            if self.backing is None and fields[12]:
                f.seek(fields[12])
                self.backing = os.path.join(
                    base, os.fsdecode(f.read(fields[13])))

    def _bit(self, meta: BinaryIO, n: int) -> bool:
        meta.seek(self.bitmap_offset + n // 8)
        return bool(meta.read(1)[0] & (1 << (n % 8)))

    def _backing_read(self, offset: int, length: int) -> bytes:
        if self.backing is None:
            return bytes(length)
        with open(self.backing, 'rb') as b:
            b.seek(offset)
            data = b.read(length)
        return data + bytes(length - len(data))

    def write(self, offset: int, data: bytes) -> None:
        """Write data at guest offset, allocating clusters as needed."""
        assert offset + len(data) <= self.virtual_size
        cs = self.cluster_size
        new_bits: List[int] = []
        with open(self.path, 'r+b') as meta, \
                open(self.image, 'r+b') as img:
            first = offset // cs
            last = (offset + len(data) - 1) // cs
            for n in range(first, last + 1):
                c_start = n * cs
                c_end = min(c_start + cs, self.virtual_size)
                lo = max(offset, c_start)
                hi = min(offset + len(data), c_end)
                piece = data[lo - offset:hi - offset]
                if self._bit(meta, n):
                    img.seek(lo)
                    img.write(piece)
                    continue
                # Allocating write: COW fill plus guest data in one write
                buf = bytearray(self._backing_read(c_start, c_end - c_start))
                buf[lo - c_start:hi - c_start] = piece
                img.seek(c_start)
                img.write(buf)
                new_bits.append(n)
            img.flush()
            os.fsync(img.fileno())      # data before bits
            for n in new_bits:
                meta.seek(self.bitmap_offset + n // 8)
                byte = meta.read(1)[0] | (1 << (n % 8))
                meta.seek(self.bitmap_offset + n // 8)
                meta.write(bytes([byte]))
            meta.flush()
            os.fsync(meta.fileno())


# --- self-test -------------------------------------------------------------

def _pattern(seed: int, length: int) -> bytes:
    rnd = random.Random(seed)
    return rnd.randbytes(length)


def _roundtrip(tmp: str, cluster_bits: int, size: int, backing_size: int,
               image_len: Optional[int] = None) -> None:
    """Random writes through Writer; reader must match a model."""
    # pylint: disable=too-many-locals
    d = tempfile.mkdtemp(dir=tmp)
    base = os.path.join(d, 'base.raw')
    base_data = _pattern(cluster_bits, backing_size)
    with open(base, 'wb') as f:
        f.write(base_data)
    img = os.path.join(d, 't.add-cow')
    create(img, size, backing='base.raw', cluster_bits=cluster_bits)
    if image_len is not None:
        with open(img + '.img', 'r+b') as f:
            f.truncate(image_len)
    model = bytearray(base_data[:size].ljust(size, b'\0'))
    w = Writer(img)
    rnd = random.Random(size ^ cluster_bits)
    cs = 1 << cluster_bits
    writes: List[Tuple[int, int]] = [
        (0, 1), (cs - 1, 2), (size - 1, 1), (size // 2, min(3 * cs, 4096))]
    for _ in range(20):
        off = rnd.randrange(size)
        writes.append((off, rnd.randrange(1, min(size - off, 3 * cs) + 1)))
    for off, length in writes:
        length = min(length, size - off)
        data = _pattern(off, length)
        w.write(off, data)
        model[off:off + length] = data
    # Open from another working directory: names must resolve next to img
    cwd = os.getcwd()
    os.chdir('/')
    try:
        with reader.Image(os.path.relpath(img, '/')) as r:
            out = os.path.join(d, 'dump')
            with open(out, 'wb') as f:
                r.dump(f)
            with open(out, 'rb') as f:
                got = f.read()
            if got != bytes(model):
                bad = next(i for i in range(size) if got[i] != model[i])
                raise AssertionError(f'cluster_bits {cluster_bits} size '
                                     f'{size}: mismatch at {bad}')
            mapped = sum(length for _, length, state in r.runs() if state)
            assert r.read(0, size) == bytes(model)
            assert mapped <= size and not r.warnings, r.warnings
    finally:
        os.chdir(cwd)


Mutator = Callable[[bytearray], None]


def _put(fmt: str, offset: int, value: object) -> Mutator:
    def mutate(hdr: bytearray) -> None:
        struct.pack_into(fmt, hdr, offset, value)
    return mutate


def _put_bytes(offset: int, value: bytes) -> Mutator:
    def mutate(hdr: bytearray) -> None:
        hdr[offset:offset + len(value)] = value
    return mutate


MALFORMED: Dict[str, Tuple[Mutator, str]] = {
    'magic': (_put_bytes(0, b'QFI\xfb'), 'magic'),
    'header_size_align': (_put('<I', 4, 1000), 'header_size'),
    'header_size_big': (_put('<I', 4, 2 * 1024 * 1024), 'header_size'),
    'header_size_zero': (_put('<I', 4, 0), 'header_size'),
    'cluster_bits_small': (_put('<I', 8, 8), 'cluster_bits'),
    'cluster_bits_big': (_put('<I', 8, 22), 'cluster_bits'),
    'reserved0': (_put('<I', 12, 1), 'reserved0'),
    'incompatible': (_put('<Q', 16, 1 << 5), 'incompatible feature bit 5'),
    'virtual_size': (_put('<Q', 40, 1000), 'virtual_size'),
    'virtual_size_2_63': (_put('<Q', 40, 1 << 63), 'virtual_size'),
    'bitmap_offset_align': (_put('<Q', 48, 16385), 'bitmap_offset'),
    'bitmap_offset_low': (_put('<Q', 48, 512), 'bitmap_offset'),
    'bitmap_size': (_put('<Q', 56, 1024), 'bitmap_size'),
    'bitmap_past_eof': (_put('<Q', 48, 1 << 40), 'bitmap ends'),
    'bitmap_overflow': (_put('<Q', 48, (1 << 64) - 512), 'overflows'),
    'image_name_size_zero': (_put('<I', 68, 0), 'image name'),
    'image_name_size_big': (_put('<I', 68, 4096), 'image name'),
    'image_name_offset_low': (_put('<I', 64, 100), 'image name'),
    'image_name_past_header': (_put('<I', 64, 16380), 'image name'),
    'backing_half': (_put('<I', 76, 0), 'backing name'),
    'backing_overlap': (_put('<I', 72, 130), 'overlap'),
    'image_name_nul': (_put_bytes(129, b'\0'), 'NUL'),
    'image_format_empty': (_put_bytes(80, bytes(16)), 'image_format'),
    'image_format_unterminated': (_put_bytes(80, b'r' * 16), 'image_format'),
    'backing_format_empty': (_put_bytes(96, bytes(16)), 'backing_format'),
    'image_format_padding': (_put_bytes(84, b'x'), 'image_format'),
    'backing_format_padding': (_put_bytes(111, b'x'), 'backing_format'),
    'image_format_char': (_put_bytes(80, b'r.w'), 'image_format'),
    'backing_format_char': (_put_bytes(96, b'ra '), 'backing_format'),
    'backing_format_not_ascii': (_put_bytes(96, b'r\xe9w'),
                                 'backing_format'),
    'reserved1': (_put_bytes(127, b'\x01'), 'reserved1'),
    'all_allocated': (_put('<Q', 32, 1), 'all allocated'),
}


def _malformed(tmp: str) -> int:
    d = tempfile.mkdtemp(dir=tmp)
    img = os.path.join(d, 'm.add-cow')
    size = 1024 * 1024
    good = make_header(size, b'image-file-name.img', b'backing.raw', b'raw')
    bitmap = bytes(bitmap_size(size, 16))
    with open(img, 'wb') as f:
        f.write(good + bitmap)
    with reader.Image(img):
        pass                        # the unmodified header is valid
    for name, entry in MALFORMED.items():
        hdr = bytearray(good)
        mutator: Mutator = entry[0]
        expect = entry[1]
        mutator(hdr)
        with open(img, 'wb') as f:
            f.write(bytes(hdr) + bitmap)
        try:
            with reader.Image(img):
                pass
        except reader.AddCowError as e:
            if expect not in str(e) or img not in str(e):
                raise AssertionError(f'{name}: unexpected error: {e}') \
                    from None
            continue
        raise AssertionError(f'{name}: malformed header was accepted')
    # No backing file: everything reads as zeros
    with open(img, 'wb') as f:
        f.write(make_header(size, b'x.img') + bitmap)
    with reader.Image(img) as r:
        assert r.read(0, size) == bytes(size)
    # A truncated .add-cow file
    with open(img, 'wb') as f:
        f.write(make_header(size, b'x.img'))
    try:
        reader.Image(img).close()
        raise AssertionError('truncated bitmap was accepted')
    except reader.AddCowError as e:
        assert 'bitmap ends' in str(e), e
    # A file that ends inside the last bitmap sector: the rest reads 0
    with open(img, 'wb') as f:
        f.write(make_header(size, b'x.img') + b'\x05')
    with open(os.path.join(d, 'x.img'), 'wb') as f:
        f.write(b'\x42' * size)
    with reader.Image(img) as r:
        assert r.allocated_clusters() == 2, r.allocated_clusters()
        assert r.read(0, 65536) == b'\x42' * 65536
        assert r.read(65536, 65536) == bytes(65536)
    return len(MALFORMED) + 3


def _plain_names(tmp: str) -> None:
    """
    Image file names are plain file names: json: strings and protocol
    prefixes name the file of that name next to the .add-cow file.
    """
    d = tempfile.mkdtemp(dir=tmp)
    img = os.path.join(d, 'p.add-cow')
    size = 65536
    bitmap = b'\x01' + bytes(bitmap_size(size, 16) - 1)
    for name in (b'json:{"driver":"null-co"}', b'nbd:localhost:10809',
                 b'file:x.img', b'snap-07:00.img'):
        with open(img, 'wb') as f:
            f.write(make_header(size, name) + bitmap)
        with reader.Image(img) as r:
            try:
                r.read(0, size)
                raise AssertionError(f'{name!r}: read without the file')
            except reader.AddCowError as e:
                assert 'cannot open image file' in str(e), e
        with open(os.path.join(d, os.fsdecode(name)), 'wb') as f:
            f.write(b'\x42' * size)
        with reader.Image(img) as r:
            assert r.image_path() == os.path.join(d, os.fsdecode(name))
            assert r.read(0, size) == b'\x42' * size, name


def _self_references(tmp: str) -> None:
    """The image file is neither the .add-cow file nor the backing file"""
    d = tempfile.mkdtemp(dir=tmp)
    img = os.path.join(d, 's.add-cow')
    size = 2 * 65536               # cluster 0 allocated, cluster 1 not
    bitmap = b'\x01' + bytes(bitmap_size(size, 16) - 1)
    with open(os.path.join(d, 'b.raw'), 'wb') as f:
        f.write(b'\x11' * size)
    for name, backing, expect in (
            (b's.add-cow', None, 'the .add-cow file itself'),
            (b'./s.add-cow', None, 'the .add-cow file itself'),
            (b'b.raw', b'b.raw', 'are the same file'),
            (b'x.img', b's.add-cow', 'the .add-cow file itself')):
        with open(img, 'wb') as f:
            f.write(make_header(size, name, backing,
                                b'raw' if backing else b'') + bitmap)
        with open(os.path.join(d, 'x.img'), 'wb') as f:
            f.write(b'\x42' * size)
        with reader.Image(img) as r:
            try:
                r.read(0, size)
                raise AssertionError(f'{name!r}/{backing!r} was read')
            except reader.AddCowError as e:
                assert expect in str(e), e


def _warnings(tmp: str) -> None:
    """Informational problems are reported but do not stop reading."""
    d = tempfile.mkdtemp(dir=tmp)
    img = os.path.join(d, 'w.add-cow')
    size = 3 * 65536
    hdr = bytearray(make_header(size, b'x.img'))
    struct.pack_into('<Q', hdr, 48, len(hdr) + 512)      # bitmap_offset
    hdr[1000] = 1                                       # name area junk
    gap = b'\x01' + bytes(511)
    bitmap = bytearray(bitmap_size(size, 16))
    bitmap[0] = 0xff                                    # bits 3-7: padding
    with open(img, 'wb') as f:
        f.write(bytes(hdr) + gap + bytes(bitmap))
    with open(os.path.join(d, 'x.img'), 'wb') as f:
        f.write(b'\x42' * size)
    with reader.Image(img) as r:
        assert r.read(0, size) == b'\x42' * size
        assert len(r.warnings) == 3, r.warnings
    with reader.Image(img, allow_inconsistent=True):
        pass


def selftest() -> int:
    """Run all self-tests; return the number of failures."""
    tests: List[Tuple[str, Callable[[str], object]]] = []
    for bits in range(9, 22):
        tests.append((f'roundtrip cluster_bits={bits}',
                      functools.partial(_roundtrip, cluster_bits=bits,
                                        size=3 * 1024 * 1024 + 512,
                                        backing_size=2 * 1024 * 1024)))
    tests.append(('image larger than backing',
                  lambda t: _roundtrip(t, 16, 4 << 20, 1 << 20)))
    tests.append(('image smaller than backing',
                  lambda t: _roundtrip(t, 16, 1 << 20, 4 << 20)))
    tests.append(('image file shorter than virtual size',
                  lambda t: _roundtrip(t, 12, 1 << 20, 4 << 20, 4096)))
    tests.append(('malformed headers', _malformed))
    tests.append(('plain image file names', _plain_names))
    tests.append(('self references', _self_references))
    tests.append(('consistency warnings', _warnings))
    passed = failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in tests:
            try:
                fn(tmp)
                passed += 1
            except AssertionError as e:
                print(f'FAIL: {name}: {e}')
                failed += 1
    print(f'{passed} passed, {failed} failed')
    return failed


def main() -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest='cmd', required=True)
    p = sub.add_parser('create')
    p.add_argument('file')
    p.add_argument('size', type=int)
    p.add_argument('--image-file')
    p.add_argument('--backing')
    p.add_argument('--backing-fmt', default='raw')
    p.add_argument('--cluster-bits', type=int, default=16)
    p = sub.add_parser('write')
    p.add_argument('file')
    p.add_argument('offset', type=int)
    p.add_argument('pattern', type=lambda s: int(s, 0))
    p.add_argument('length', type=int)
    p.add_argument('--backing-raw')
    sub.add_parser('selftest')
    args = parser.parse_args()
    if args.cmd == 'create':
        create(args.file, args.size, args.image_file, args.backing,
               args.backing_fmt, args.cluster_bits)
    elif args.cmd == 'write':
        Writer(args.file, args.backing_raw).write(
            args.offset, bytes([args.pattern]) * args.length)
    else:
        return 1 if selftest() else 0
    return 0


if __name__ == '__main__':
    sys.exit(main())
