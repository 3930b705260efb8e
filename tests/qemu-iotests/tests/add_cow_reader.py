#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Independent reader for add-cow images
#
# Written from docs/specs/add-cow.txt alone, without looking at QEMU's
# driver, so that it can cross-check what QEMU writes.  It validates every
# header field and reconstructs the guest disk: allocated clusters come from
# the (raw) image file, unallocated ones from a raw backing file or zeros.
#
# Usage:
#   add_cow_reader.py IMAGE.add-cow [--backing-raw FILE] --dump OUT
#   add_cow_reader.py IMAGE.add-cow --map
#   add_cow_reader.py IMAGE.add-cow --info
#
# Copyright (c) 2026 The add-cow authors

"""Validate add-cow images and reconstruct their guest disk."""

import argparse
import os
import struct
import sys
from typing import BinaryIO, Iterator, List, NamedTuple, Optional, Tuple


MAGIC = b'ACOW'
FIXED_HEADER_SIZE = 128
MIN_HEADER_SIZE = 512
MAX_HEADER_SIZE = 1024 * 1024
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_NAME_SIZE = 4095
FMT_SIZE = 16
SECTOR = 512
U64_MAX = (1 << 64) - 1

# Feature bits this reader knows
KNOWN_INCOMPATIBLE = 0
AUTOCLEAR_ALL_ALLOCATED = 1 << 0

# magic, header_size, cluster_bits, reserved0,
# incompatible, compatible, autoclear,
# virtual_size, bitmap_offset, bitmap_size,
# image_name_offset, image_name_size, backing_name_offset, backing_name_size,
# image_format, backing_format, reserved1
HEADER_STRUCT = struct.Struct('<4sIII QQQ QQQ IIII 16s16s16s')
assert HEADER_STRUCT.size == FIXED_HEADER_SIZE

CHUNK = 1024 * 1024


class AddCowError(Exception):
    """An add-cow image is malformed or cannot be read."""


class Header(NamedTuple):
    """The fixed part of an add-cow header, as stored on disk."""
    magic: bytes
    header_size: int
    cluster_bits: int
    reserved0: int
    incompatible_features: int
    compatible_features: int
    autoclear_features: int
    virtual_size: int
    bitmap_offset: int
    bitmap_size: int
    image_name_offset: int
    image_name_size: int
    backing_name_offset: int
    backing_name_size: int
    image_format: bytes
    backing_format: bytes
    reserved1: bytes


def div_round_up(num: int, den: int) -> int:
    """Integer division rounding up."""
    return (num + den - 1) // den


def round_up(num: int, align: int) -> int:
    """Round num up to a multiple of align."""
    return div_round_up(num, align) * align


def expected_bitmap_size(nb_clusters: int) -> int:
    """Bitmap size in bytes that the spec requires for nb_clusters."""
    return round_up(div_round_up(nb_clusters, 8), SECTOR)


def bit_list(mask: int) -> str:
    """Format the set bits of mask as 'bit 3, bit 17'."""
    return ', '.join(f'bit {i}' for i in range(64) if mask & (1 << i))


def has_protocol_prefix(name: str) -> bool:
    """True if a ':' comes before the first '/' (or there is no '/').

    Only used for backing file names, which an implementation may
    interpret; image file names are plain file names whatever they contain.
    """
    colon = name.find(':')
    if colon < 0:
        return False
    slash = name.find('/')
    return slash < 0 or colon < slash


def parse_format(raw: bytes, what: str) -> str:
    """Decode a 16-byte NUL-terminated format field; '' if all zero."""
    if raw == bytes(FMT_SIZE):
        return ''
    nul = raw.find(b'\0')
    if nul < 0:
        raise AddCowError(f'{what} is not NUL-terminated within '
                          f'{FMT_SIZE} bytes')
    if nul == 0:
        raise AddCowError(f'{what} is empty but not all zero')
    if any(raw[nul:]):
        raise AddCowError(f'{what} has non-zero bytes after its NUL '
                          f'terminator')
    value = raw[:nul]
    if any(not (chr(c).isascii() and (chr(c).isalnum() or chr(c) in '-_'))
           for c in value):
        raise AddCowError(f'{what} {value!r} has a byte that is not an '
                          f'ASCII letter or digit, - or _')
    return value.decode('ascii')


class Image:
    """An opened, validated add-cow image (read-only)."""

    # pylint: disable=too-many-instance-attributes

    def __init__(self, path: str, backing_raw: Optional[str] = None,
                 allow_inconsistent: bool = False) -> None:
        """Open and validate the .add-cow file at path.

        backing_raw, if given, replaces the backing file named in the header
        with a raw file (for example one produced by qemu-img convert).
        """
        self.path = path
        self.backing_override = backing_raw
        self._meta: Optional[BinaryIO] = None
        self._image: Optional[BinaryIO] = None
        self._backing: Optional[BinaryIO] = None
        self._image_len = 0
        self._backing_len = 0
        self.warnings: List[str] = []
        try:
            # pylint: disable=consider-using-with
            self._meta = open(path, 'rb')
        except OSError as e:
            raise AddCowError(f'{path}: cannot open: {e.strerror}') from None
        try:
            self._validate(allow_inconsistent)
        except AddCowError as e:
            self.close()
            raise AddCowError(f'{path}: {e}') from None
        except BaseException:
            self.close()
            raise

    # --- validation -----------------------------------------------------

    def _validate(self, allow_inconsistent: bool) -> None:
        # pylint: disable=too-many-branches,too-many-statements
        assert self._meta is not None
        file_len = os.fstat(self._meta.fileno()).st_size
        fixed = self._meta.read(FIXED_HEADER_SIZE)
        if len(fixed) < FIXED_HEADER_SIZE:
            raise AddCowError(f'file is {file_len} bytes long, shorter than '
                              f'the {FIXED_HEADER_SIZE}-byte fixed header')
        h = Header(*HEADER_STRUCT.unpack(fixed))
        self.header = h

        if h.magic != MAGIC:
            raise AddCowError(f'magic: expected {MAGIC!r}, found {h.magic!r}')

        if h.header_size % SECTOR:
            raise AddCowError(f'header_size {h.header_size} is not a '
                              f'multiple of {SECTOR}')
        if not MIN_HEADER_SIZE <= h.header_size <= MAX_HEADER_SIZE:
            raise AddCowError(f'header_size {h.header_size} is outside '
                              f'[{MIN_HEADER_SIZE}, {MAX_HEADER_SIZE}]')

        if not MIN_CLUSTER_BITS <= h.cluster_bits <= MAX_CLUSTER_BITS:
            raise AddCowError(f'cluster_bits {h.cluster_bits} is outside '
                              f'[{MIN_CLUSTER_BITS}, {MAX_CLUSTER_BITS}]')
        self.cluster_size = 1 << h.cluster_bits

        if h.reserved0:
            raise AddCowError(f'reserved0 is {h.reserved0:#x}, must be 0')
        if h.reserved1 != bytes(len(h.reserved1)):
            raise AddCowError('reserved1 (bytes 112-127) is not all zero')

        unknown = h.incompatible_features & ~KNOWN_INCOMPATIBLE
        if unknown:
            raise AddCowError(f'unknown incompatible feature '
                              f'{bit_list(unknown)} '
                              f'(incompatible_features '
                              f'{h.incompatible_features:#x})')
        # Unknown compatible and autoclear bits may be ignored by a reader.

        if h.virtual_size % SECTOR:
            raise AddCowError(f'virtual_size {h.virtual_size} is not a '
                              f'multiple of {SECTOR}')
        if h.virtual_size >= 1 << 63:
            raise AddCowError(f'virtual_size {h.virtual_size} is not less '
                              f'than 2^63')
        self.virtual_size = h.virtual_size
        self.nb_clusters = div_round_up(h.virtual_size, self.cluster_size)

        if h.bitmap_offset % SECTOR:
            raise AddCowError(f'bitmap_offset {h.bitmap_offset} is not a '
                              f'multiple of {SECTOR}')
        if h.bitmap_offset < h.header_size:
            raise AddCowError(f'bitmap_offset {h.bitmap_offset} is smaller '
                              f'than header_size {h.header_size}')
        want = expected_bitmap_size(self.nb_clusters)
        if h.bitmap_size != want:
            raise AddCowError(f'bitmap_size {h.bitmap_size} does not match '
                              f'{want} required for {self.nb_clusters} '
                              f'clusters')
        bitmap_end = h.bitmap_offset + h.bitmap_size
        if bitmap_end > U64_MAX:
            raise AddCowError(f'bitmap_offset {h.bitmap_offset} + '
                              f'bitmap_size {h.bitmap_size} overflows')
        # Bytes of the last bitmap sector past the end of the file read 0
        if round_up(file_len, SECTOR) < bitmap_end:
            raise AddCowError(f'file is {file_len} bytes long, but the '
                              f'bitmap ends at {bitmap_end}')

        image_range = self._check_name_range(
            'image name', h.image_name_offset, h.image_name_size,
            required=True)
        backing_range = self._check_name_range(
            'backing name', h.backing_name_offset, h.backing_name_size,
            required=False)
        if backing_range and image_range and \
                image_range[0] < backing_range[1] and \
                backing_range[0] < image_range[1]:
            raise AddCowError(f'image name [{image_range[0]}, '
                              f'{image_range[1]}) and backing name '
                              f'[{backing_range[0]}, {backing_range[1]}) '
                              f'overlap')

        assert image_range is not None
        self._meta.seek(0)
        header = self._meta.read(h.header_size)
        self.image_name = self._read_name(header, 'image name', image_range)
        self.backing_name: Optional[str] = None
        if backing_range:
            self.backing_name = self._read_name(header, 'backing name',
                                                backing_range)

        # The image file name is a plain file name, whatever it contains
        # (json:..., nbd:..., a colon anywhere): see _open_image()

        self.image_format = parse_format(h.image_format, 'image_format')
        if not self.image_format:
            raise AddCowError('image_format is empty')
        self.backing_format = parse_format(h.backing_format,
                                           'backing_format')
        if self.backing_name is None and self.backing_format:
            raise AddCowError(f'backing_format is {self.backing_format!r} '
                              f'but there is no backing file')
        if self.backing_name is not None and not self.backing_format:
            raise AddCowError('backing_format is empty but a backing file '
                              'is named')

        self._meta.seek(h.bitmap_offset)
        self.bitmap = self._meta.read(h.bitmap_size)
        self.bitmap += bytes(h.bitmap_size - len(self.bitmap))

        self.all_allocated = bool(h.autoclear_features &
                                  AUTOCLEAR_ALL_ALLOCATED)
        if self.all_allocated:
            first_zero = self._first_clear_bit()
            if first_zero is not None:
                msg = (f'autoclear bit 0 (all allocated) is set, but the '
                       f'bit of cluster {first_zero} is 0')
                if not allow_inconsistent:
                    raise AddCowError(msg)
                self.warnings.append(msg)

        self._check_padding(header, image_range, backing_range)

    def _check_name_range(self, what: str, offset: int, size: int,
                          required: bool) -> Optional[Tuple[int, int]]:
        if not required and offset == 0 and size == 0:
            return None
        if not required and (offset == 0 or size == 0):
            raise AddCowError(f'{what}: offset {offset} and size {size} '
                              f'must both be 0 or both be non-zero')
        if size == 0:
            raise AddCowError(f'{what}: size is 0, but the name is required')
        if size > MAX_NAME_SIZE:
            raise AddCowError(f'{what}: size {size} exceeds {MAX_NAME_SIZE}')
        if offset < FIXED_HEADER_SIZE:
            raise AddCowError(f'{what}: offset {offset} lies in the fixed '
                              f'header (below {FIXED_HEADER_SIZE})')
        if offset + size > self.header.header_size:
            raise AddCowError(f'{what}: bytes [{offset}, {offset + size}) '
                              f'extend past header_size '
                              f'{self.header.header_size}')
        return (offset, offset + size)

    def _read_name(self, header: bytes, what: str,
                   rng: Tuple[int, int]) -> str:
        raw = header[rng[0]:rng[1]]
        nul = raw.find(0)
        if nul >= 0:
            raise AddCowError(f'{what} contains a NUL byte at offset '
                              f'{rng[0] + nul}')
        return os.fsdecode(raw)

    def _check_padding(self, header: bytes,
                       image_range: Optional[Tuple[int, int]],
                       backing_range: Optional[Tuple[int, int]]) -> None:
        """Record informational consistency problems (never fatal)."""
        for bit in range(self.nb_clusters, len(self.bitmap) * 8):
            if self.bitmap[bit >> 3] & (1 << (bit & 7)):
                self.warnings.append(f'padding bit {bit} of the bitmap is '
                                     f'set (ignored)')
                break
        area = bytearray(header[FIXED_HEADER_SIZE:])
        for rng in (image_range, backing_range):
            if rng:
                start = rng[0] - FIXED_HEADER_SIZE
                area[start:start + rng[1] - rng[0]] = bytes(rng[1] - rng[0])
        if any(area):
            self.warnings.append('unused bytes of the name area are not '
                                 'zero (ignored)')
        assert self._meta is not None
        gap = self.header.bitmap_offset - self.header.header_size
        self._meta.seek(self.header.header_size)
        while gap > 0:
            chunk = self._meta.read(min(gap, CHUNK))
            if not chunk:
                break
            if chunk.count(0) != len(chunk):
                self.warnings.append('bytes between the header and the '
                                     'bitmap are not zero (ignored)')
                break
            gap -= len(chunk)

    def _first_clear_bit(self) -> Optional[int]:
        full = self.nb_clusters // 8
        for i in range(full):
            if self.bitmap[i] != 0xff:
                byte = self.bitmap[i]
                return i * 8 + next(b for b in range(8)
                                    if not byte & (1 << b))
        for n in range(full * 8, self.nb_clusters):
            if not self.allocated(n):
                return n
        return None

    # --- bitmap ---------------------------------------------------------

    def allocated(self, cluster: int) -> bool:
        """Whether the bitmap bit of cluster is 1."""
        return bool(self.bitmap[cluster >> 3] & (1 << (cluster & 7)))

    def cluster_runs(self) -> Iterator[Tuple[int, int, bool]]:
        """Yield (first_cluster, end_cluster, allocated) runs."""
        total = self.nb_clusters
        if self.all_allocated:
            if total:
                yield (0, total, True)
            return
        n = 0
        while n < total:
            state = self.allocated(n)
            fast = 0xff if state else 0x00
            m = n + 1
            while m < total:
                if m & 7 == 0 and m + 8 <= total and \
                        self.bitmap[m >> 3] == fast:
                    m += 8
                    continue
                if self.allocated(m) != state:
                    break
                m += 1
            yield (n, m, state)
            n = m

    def runs(self) -> Iterator[Tuple[int, int, bool]]:
        """Yield (offset, length, allocated) byte runs of the guest disk."""
        for first, end, state in self.cluster_runs():
            start = first * self.cluster_size
            stop = min(end * self.cluster_size, self.virtual_size)
            yield (start, stop - start, state)

    # --- data files -----------------------------------------------------

    def _resolve(self, name: str) -> str:
        if os.path.isabs(name):
            return name
        return os.path.join(os.path.dirname(os.path.abspath(self.path)),
                            name)

    def image_path(self) -> str:
        """Path of the image file, resolved per the spec."""
        return self._resolve(self.image_name)

    def backing_path(self) -> Optional[str]:
        """Path of the raw backing file to use, or None for zeros.

        Without a backing file in the header, unallocated clusters read as
        zeros even if an override was given.
        """
        if self.backing_name is None:
            return None
        if self.backing_override is not None:
            return self.backing_override
        if has_protocol_prefix(self.backing_name):
            raise AddCowError(f'{self.path}: backing file '
                              f'{self.backing_name!r} is a protocol URL; '
                              f'pass --backing-raw')
        if self.backing_format != 'raw':
            raise AddCowError(f'{self.path}: backing file format '
                              f'{self.backing_format!r} is not supported; '
                              f'convert it to raw and pass --backing-raw')
        return self._resolve(self.backing_name)

    def _same_file(self, f: BinaryIO, other: Optional[BinaryIO]) -> bool:
        if other is None:
            return False
        a = os.fstat(f.fileno())
        b = os.fstat(other.fileno())
        return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)

    def _check_not_self(self, f: BinaryIO, what: str, path: str) -> None:
        """The image and backing files are neither the .add-cow file nor
        each other."""
        other = self._backing if what == 'image file' else self._image
        if self._same_file(f, self._meta):
            f.close()
            raise AddCowError(f'{self.path}: the {what} {path} is the '
                              f'.add-cow file itself')
        if self._same_file(f, other):
            f.close()
            raise AddCowError(f'{self.path}: the image file and the '
                              f'backing file are the same file ({path})')

    def _open_image(self) -> BinaryIO:
        if self._image is None:
            if self.image_format != 'raw':
                raise AddCowError(f'{self.path}: image file format '
                                  f'{self.image_format!r} is not supported '
                                  f'by this reader (only raw)')
            path = self.image_path()
            try:
                # pylint: disable=consider-using-with
                f = open(path, 'rb')
            except OSError as e:
                raise AddCowError(f'{self.path}: cannot open image file '
                                  f'{path}: {e.strerror}') from None
            self._check_not_self(f, 'image file', path)
            self._image = f
            self._image_len = os.fstat(f.fileno()).st_size
        return self._image

    def _open_backing(self) -> Optional[BinaryIO]:
        if self._backing is None:
            path = self.backing_path()
            if path is None:
                return None
            try:
                # pylint: disable=consider-using-with
                f = open(path, 'rb')
            except OSError as e:
                raise AddCowError(f'{self.path}: cannot open backing file '
                                  f'{path}: {e.strerror}') from None
            self._check_not_self(f, 'backing file', path)
            self._backing = f
            self._backing_len = os.fstat(f.fileno()).st_size
        return self._backing

    @staticmethod
    def _pread(f: BinaryIO, file_len: int, offset: int, length: int) -> bytes:
        """Read length bytes at offset; zeros past the end of the file."""
        if offset >= file_len:
            return bytes(length)
        f.seek(offset)
        data = f.read(min(length, file_len - offset))
        return data + bytes(length - len(data))

    def _source_len(self, allocated: bool) -> int:
        """Length of the file a run reads from (0 if it reads zeros)."""
        if allocated:
            self._open_image()
            return self._image_len
        if self._open_backing() is None:
            return 0
        return self._backing_len

    def read_run(self, offset: int, length: int, allocated: bool) -> bytes:
        """Read guest bytes from a run of uniform allocation state."""
        if allocated:
            f = self._open_image()
            return self._pread(f, self._image_len, offset, length)
        b = self._open_backing()
        if b is None:
            return bytes(length)
        return self._pread(b, self._backing_len, offset, length)

    def read(self, offset: int, length: int) -> bytes:
        """Read guest bytes [offset, offset + length)."""
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            raise ValueError('read outside the virtual disk')
        out = bytearray()
        for start, run_len, state in self.runs():
            lo = max(start, offset)
            hi = min(start + run_len, offset + length)
            if lo < hi:
                out += self.read_run(lo, hi - lo, state)
        return bytes(out)

    def dump(self, out: BinaryIO) -> None:
        """Write the whole guest disk to out.

        If out is seekable, runs of zeros are skipped so that the output
        file is sparse.
        """
        sparse = out.seekable()
        zero = bytes(CHUNK)
        for start, run_len, state in self.runs():
            pos = start
            if sparse and start >= self._source_len(state):
                out.seek(run_len, os.SEEK_CUR)
                continue
            while pos < start + run_len:
                n = min(CHUNK, start + run_len - pos)
                data = self.read_run(pos, n, state)
                if sparse and data == zero[:n]:
                    out.seek(n, os.SEEK_CUR)
                else:
                    out.write(data)
                pos += n
        if sparse:
            out.truncate(self.virtual_size)

    def info(self) -> List[str]:
        """Header fields as 'name: value' lines."""
        h = self.header
        lines = [
            f'header_size: {h.header_size}',
            f'cluster_bits: {h.cluster_bits}',
            f'cluster_size: {self.cluster_size}',
            f'incompatible_features: {h.incompatible_features:#x}',
            f'compatible_features: {h.compatible_features:#x}',
            f'autoclear_features: {h.autoclear_features:#x}',
            f'virtual_size: {h.virtual_size}',
            f'nb_clusters: {self.nb_clusters}',
            f'bitmap_offset: {h.bitmap_offset}',
            f'bitmap_size: {h.bitmap_size}',
            f'image_name: {self.image_name}',
            f'image_format: {self.image_format}',
            f'backing_name: {self.backing_name or ""}',
            f'backing_format: {self.backing_format}',
            f'allocated_clusters: {self.allocated_clusters()}',
        ]
        return lines

    def allocated_clusters(self) -> int:
        """Number of clusters whose data is in the image file."""
        if self.all_allocated:
            return self.nb_clusters
        return sum(end - first for first, end, state in self.cluster_runs()
                   if state)

    def close(self) -> None:
        """Close all files."""
        for f in (self._meta, self._image, self._backing):
            if f is not None:
                f.close()
        self._meta = self._image = self._backing = None

    def __enter__(self) -> 'Image':
        return self

    def __exit__(self, *args: object) -> None:
        self.close()


def main(argv: Optional[List[str]] = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(
        description='Validate an add-cow image and reconstruct its disk '
                    '(independent of QEMU)')
    parser.add_argument('image', help='the .add-cow file')
    parser.add_argument('--backing-raw', metavar='FILE',
                        help='raw file to use instead of the backing file '
                             'named in the header')
    parser.add_argument('--dump', metavar='OUT',
                        help='write the whole guest disk (raw) to OUT')
    parser.add_argument('--map', action='store_true',
                        help='print runs: offset length allocated|'
                             'unallocated (hex)')
    parser.add_argument('--info', action='store_true',
                        help='print the header fields')
    parser.add_argument('--check', action='store_true',
                        help='also report non-fatal inconsistencies; exit '
                             'with 3 if there are any')
    args = parser.parse_args(argv)

    try:
        with Image(args.image, args.backing_raw,
                   allow_inconsistent=args.check) as img:
            if args.backing_raw and img.backing_name is None:
                print(f'add_cow_reader: {args.image} has no backing file; '
                      f'ignoring --backing-raw', file=sys.stderr)
            if args.info:
                print('\n'.join(img.info()))
            if args.map:
                for start, length, state in img.runs():
                    word = 'allocated' if state else 'unallocated'
                    print(f'{start:#x} {length:#x} {word}')
            if args.dump:
                with open(args.dump, 'wb') as out:
                    img.dump(out)
            if args.check:
                for w in img.warnings:
                    print(f'{args.image}: warning: {w}')
                if img.warnings:
                    return 3
    except AddCowError as e:
        print(f'add_cow_reader: {e}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
