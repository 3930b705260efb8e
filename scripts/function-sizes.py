#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Lines and function sizes of C files in QEMU's style (a function's body
# between a "{" and a "}" at the start of a line): per file the line
# count, the number of functions, the median and largest body, and the
# median and largest with the signature; then the totals.
#
# Usage: function-sizes.py FILE.c...   (e.g. block/add-cow*.c)

import re
import statistics
import sys


def functions(path):
    """(name, body lines, lines with the signature) of each function"""
    with open(path) as f:
        lines = f.read().split('\n')
    fns = []
    i = 0
    while i < len(lines):
        if lines[i] == '{':
            # the signature: the lines above, up to a blank line, a comment,
            # a preprocessor line or the end of the previous definition
            j = i - 1
            while j > 0 and lines[j - 1].strip() and \
                    not lines[j - 1].startswith(('}', '/*', ' *', '#')) and \
                    not lines[j - 1].endswith(';'):
                j -= 1
            k = i + 1
            while k < len(lines) and lines[k] != '}':
                k += 1
            m = re.search(r'(\w+)\s*\(', ' '.join(lines[j:i]))
            fns.append((m.group(1) if m else '?', k - i - 1, k - j + 1))
            i = k
        i += 1
    return len(lines) - 1, fns


def main():
    total = []
    for path in sys.argv[1:]:
        nlines, fns = functions(path)
        if not fns:
            print('%-28s lines %5d, no functions' % (path, nlines))
            continue
        total += fns
        body = [f[1] for f in fns]
        full = [f[2] for f in fns]
        big = max(fns, key=lambda f: f[1])
        print('%-28s lines %5d fns %3d body median %5.1f max %3d (%s) | '
              'with signature median %5.1f max %3d' %
              (path.split('/')[-1], nlines, len(fns),
               statistics.median(body), big[1], big[0],
               statistics.median(full), max(full)))
    if not total:
        return
    body = [f[1] for f in total]
    print('total: %d functions, body median %.1f, max %d' %
          (len(total), statistics.median(body), max(body)))
    print('bodies over 60 lines:',
          [(f[0], f[1]) for f in total if f[1] > 60])
    print('over 100 lines with the signature:',
          [(f[0], f[2]) for f in total if f[2] > 100])


if __name__ == '__main__':
    main()
