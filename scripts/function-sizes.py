#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Lines and function sizes of C files in QEMU's style (a function's body
# between a "{" and a "}" at the start of a line): per file the line
# count, the number of functions, the median and largest body, and the
# median and largest with the signature; then the totals.
#
# Usage: function-sizes.py FILE.c...   (e.g. block/add-cow*.c)

import re, sys, statistics
tot = []
for path in sys.argv[1:]:
    lines = open(path).read().split('\n')
    fns = []
    i = 0
    while i < len(lines):
        if lines[i] == '{':
            # find signature start: walk back to a line at col 0 that is not blank/comment
            j = i - 1
            while j > 0 and lines[j-1].strip() and not lines[j-1].startswith(('}', '/*', ' *', '#')) and not lines[j-1].endswith(';'):
                j -= 1
            k = i + 1
            while lines[k] != '}':
                k += 1
            m = re.search(r'(\w+)\s*\(', ' '.join(lines[j:i]))
            name = m.group(1) if m else '?'
            fns.append((name, k - i - 1, k - j + 1))
            i = k
        i += 1
    body = [f[1] for f in fns]
    full = [f[2] for f in fns]
    tot += fns
    print('%-28s lines %5d fns %3d body median %5.1f max %3d (%s) | with sig median %5.1f max %3d' % (
        path.split('/')[-1], len(lines) - 1, len(fns), statistics.median(body), max(body),
        max(fns, key=lambda f: f[1])[0], statistics.median(full), max(full)))
body = [f[1] for f in tot]
print('total fns', len(tot), 'body median', statistics.median(body), 'max', max(body),
      '\nbodies over 60 lines:', [(f[0], f[1]) for f in tot if f[1] > 60], '\nover 100 lines with the signature:', [f for f in tot if f[2] > 100])
