# Fuzzing functions for add-cow header fields (docs/specs/add-cow.txt)
#
# Copyright (c) 2026 The add-cow authors
#
# SPDX-License-Identifier: GPL-2.0-or-later
#
# One function per field name of add_cow/layout.py, like qcow2/fuzz.py:
# each returns a value that is invalid, or valid but unusual, for the field.

import random

UINT32 = 0xffffffff
UINT64 = 0xffffffffffffffff
UINT32_V = [0, 1, 0x100, 0x1000, 0x10000, 0x100000, UINT32 // 4,
            UINT32 // 2 - 1, UINT32 // 2, UINT32 // 2 + 1, UINT32 - 1,
            UINT32]
UINT64_V = UINT32_V + [0x1000000, 0x10000000, 0x100000000, UINT64 // 4,
                       UINT64 // 2 - 1, UINT64 // 2, UINT64 // 2 + 1,
                       UINT64 - 1, UINT64]
SECTOR_V = [0, 1, 511, 512, 513, 4096, 16384, 1 << 20, 1 << 30]
FORMAT_V = [b'', b'raw', b'qcow2', b'add-cow', b'vmdk', b'qed', b'nbd',
            b'file', b'blkdebug', b'null-co', b'x' * 16, b'%s%s%s%s',
            b'raw\x00\xff', b'\xff' * 16]
NAME_V = [b'', b'\x00', b'/', b'..', b'/dev/null', b'/nonexistent',
          b'test.img', b'copy.img', b'json:{"driver":"null-co"}',
          b'nbd://127.0.0.1:1/x', b'%s%p%x%d', b'%99999999999s',
          b'x' * 4095, b'x' * 4096, b'a\x00b']


def _int(current, values):
    choices = [v for v in values if v != current]
    if random.random() < 0.2:
        return random.choice([current + 1, current - 1, current * 2,
                              current >> 1, current ^ (1 << 31)]) & UINT64
    return random.choice(choices)


def magic(current):
    return _int(current, UINT32_V + [0x574f4341 ^ 0x20, 0x41434f57])


def header_size(current):
    return _int(current, UINT32_V + SECTOR_V)


def cluster_bits(current):
    return _int(current, [0, 1, 8, 9, 12, 16, 21, 22, 31, 32, 63, 64, 255,
                          UINT32])


def reserved0(current):
    return _int(current, UINT32_V)


def incompatible_features(current):
    return _int(current, UINT64_V + [1, 2, 1 << 63])


def compatible_features(current):
    return _int(current, UINT64_V + [1, 2, 1 << 63])


def autoclear_features(current):
    return _int(current, UINT64_V + [0, 1, 2, 3])


def virtual_size(current):
    return _int(current, UINT64_V + SECTOR_V + [1 << 40, 1 << 50,
                                                (1 << 63) - 512])


def bitmap_offset(current):
    return _int(current, UINT64_V + SECTOR_V)


def bitmap_size(current):
    return _int(current, UINT64_V + SECTOR_V)


def image_name_offset(current):
    return _int(current, UINT32_V + [0, 64, 127, 128, 16383, 16384])


def image_name_size(current):
    return _int(current, UINT32_V + [0, 1, 4095, 4096])


def backing_name_offset(current):
    return _int(current, UINT32_V + [0, 64, 127, 128, 16383, 16384])


def backing_name_size(current):
    return _int(current, UINT32_V + [0, 1, 4095, 4096])


def image_format(current):
    return random.choice([v for v in FORMAT_V if v != current])


def backing_format(current):
    return random.choice([v for v in FORMAT_V if v != current])


def reserved1(current):
    return bytes(random.getrandbits(8) for _ in range(16))


def image_name(current):
    return random.choice([v for v in NAME_V if v != current])


def backing_name(current):
    return random.choice([v for v in NAME_V if v != current])


def bitmap_byte(current):
    return random.choice([0, 0xff, 0x55, 0x80, 0x01,
                          random.getrandbits(8)])
