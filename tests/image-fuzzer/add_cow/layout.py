# Generator of fuzzed add-cow images for tests/image-fuzzer/runner.py
#
# Copyright (c) 2026 The add-cow authors
#
# SPDX-License-Identifier: GPL-2.0-or-later
#
# A valid add-cow image (docs/specs/add-cow.txt) is laid out first: the
# 128-byte fixed header, the image file and backing file names in the name
# area, the bitmap at bitmap_offset.  The image file (raw, "test.img.data"
# next to the .add-cow file) is created sparse at the virtual size.  Then a
# random subset of the fields is fuzzed (add_cow/fuzz.py has one function
# per field).  fields_to_fuzz works like for qcow2: a list of [element] or
# [element, field name] items, elements being 'header', 'names' and
# 'bitmap'.

import os
import random
import struct

from . import fuzz

image_format = 'add-cow'

MAGIC = 0x574f4341          # "ACOW" read little-endian
HEADER_SIZE = 16384
NAME_AREA = 128
IMAGE_FILE = 'test.img.data'


class Field:
    """A value of the image at @offset, packed with struct format @fmt"""

    def __init__(self, fmt, offset, val, name):
        self.fmt = fmt
        self.offset = offset
        self.value = val
        self.name = name

    def __repr__(self):
        return f'Field({self.fmt!r}, {self.offset}, {self.value!r}, ' \
            f'{self.name!r})'

    def pack(self):
        if self.fmt.endswith('s'):
            size = int(self.fmt[1:-1] or 0)
            if size:
                return bytes(self.value[:size]).ljust(size, b'\0')
            return bytes(self.value)
        mask = (1 << (8 * struct.calcsize(self.fmt))) - 1
        return struct.pack(self.fmt, self.value & mask)


class FieldsList:
    def __init__(self, fields):
        self.data = fields

    def __getitem__(self, name):
        return [f for f in self.data if f.name == name]

    def __iter__(self):
        return iter(self.data)


class Image:
    def __init__(self, backing_file_name=None, backing_file_fmt=None):
        self.bias = random.uniform(0.2, 0.5)
        self.cluster_bits = random.randint(9, 21)
        cs = 1 << self.cluster_bits
        self.image_size = random.randint(1, 64) * cs
        if random.random() < 0.3:
            # A partial last cluster
            self.image_size -= random.randrange(0, cs, 512)
        self.image_size = max(self.image_size, 512)
        nb_clusters = -(-self.image_size // cs)
        bitmap_size = ((nb_clusters + 7) // 8 + 511) // 512 * 512

        image_name = IMAGE_FILE.encode()
        backing = (backing_file_name or '').encode()
        backing_fmt = (backing_file_fmt or '').encode() if backing else b''
        if backing_fmt == b'file':
            backing_fmt = b'raw'
        backing_off = NAME_AREA + len(image_name) if backing else 0

        h = [
            ('<I', 0, MAGIC, 'magic'),
            ('<I', 4, HEADER_SIZE, 'header_size'),
            ('<I', 8, self.cluster_bits, 'cluster_bits'),
            ('<I', 12, 0, 'reserved0'),
            ('<Q', 16, 0, 'incompatible_features'),
            ('<Q', 24, 0, 'compatible_features'),
            ('<Q', 32, 0, 'autoclear_features'),
            ('<Q', 40, self.image_size, 'virtual_size'),
            ('<Q', 48, HEADER_SIZE, 'bitmap_offset'),
            ('<Q', 56, bitmap_size, 'bitmap_size'),
            ('<I', 64, NAME_AREA, 'image_name_offset'),
            ('<I', 68, len(image_name), 'image_name_size'),
            ('<I', 72, backing_off, 'backing_name_offset'),
            ('<I', 76, len(backing), 'backing_name_size'),
            ('<16s', 80, b'raw', 'image_format'),
            ('<16s', 96, backing_fmt, 'backing_format'),
            ('<16s', 112, b'', 'reserved1'),
        ]
        self.header = FieldsList([Field(*f) for f in h])
        self.names = FieldsList([
            Field(f'<{len(image_name)}s', NAME_AREA, image_name,
                  'image_name')] + ([
                      Field(f'<{len(backing)}s', backing_off, backing,
                            'backing_name')] if backing else []))
        # Random allocation state, padding bits past the last cluster clear
        bits = [random.random() < 0.5 for _ in range(nb_clusters)]
        bm = bytearray(bitmap_size)
        for i, b in enumerate(bits):
            if b:
                bm[i // 8] |= 1 << (i % 8)
        self.bitmap = FieldsList([Field('<B', HEADER_SIZE + i, v,
                                        'bitmap_byte')
                                  for i, v in enumerate(bm)])

    def __iter__(self):
        for part in (self.header, self.names, self.bitmap):
            yield from part

    def fuzz(self, fields_to_fuzz=None):
        def coin():
            return random.random() < self.bias

        if fields_to_fuzz is None:
            for field in self:
                if field.name == 'bitmap_byte' and random.random() < 0.9:
                    continue
                if coin():
                    field.value = getattr(fuzz, field.name)(field.value)
        else:
            for item in fields_to_fuzz:
                if len(item) == 1:
                    for field in getattr(self, item[0]):
                        if coin():
                            field.value = getattr(fuzz,
                                                  field.name)(field.value)
                else:
                    for field in getattr(self, item[0])[item[1]]:
                        field.value = getattr(fuzz, field.name)(field.value)
        # Names may have changed size: keep their declared format in step
        for field in self.names:
            field.fmt = f'<{len(field.value)}s'

    def write(self, filename):
        with open(filename, 'wb') as f:
            f.truncate(HEADER_SIZE + len(self.bitmap.data))
            for field in self:
                f.seek(field.offset)
                f.write(field.pack())
        # The image file, sparse, named relative to the .add-cow file
        path = os.path.join(os.path.dirname(os.path.abspath(filename)),
                            IMAGE_FILE)
        with open(path, 'wb') as f:
            f.truncate(self.image_size)
            f.seek(0)
            f.write(os.urandom(min(self.image_size, 65536)))


def create_image(test_img_path, backing_file_name=None, backing_file_fmt=None,
                 fields_to_fuzz=None):
    """Create a fuzzed image and write it to the specified file."""
    image = Image(backing_file_name, backing_file_fmt)
    image.fuzz(fields_to_fuzz)
    image.write(test_img_path)
    return image.image_size
