#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
#
# What the tests leave uncovered in block/add-cow*.c, per function, from
# gcovr's JSON report (scripts/coverage.sh):
#   - functions never entered;
#   - for the others, the lines never run and the branch points with a
#     side never taken, each with its source line;
#   - totals per file: lines, branches, and branches without those of
#     assert() lines (from a second gcovr run that excludes them).
#
# Usage: coverage-report.py COVERAGE.json SUMMARY-NOASSERT.json SRCDIR

import bisect
import json
import os
import sys


def ranges(numbers):
    """'3-5, 9' for [3, 4, 5, 9]"""
    out = []
    for n in numbers:
        if out and out[-1][1] == n - 1:
            out[-1][1] = n
        else:
            out.append([n, n])
    return ', '.join(str(a) if a == b else f'{a}-{b}' for a, b in out)


def pct(hit, total):
    return f'{100.0 * hit / total:.1f}%' if total else 'n/a'


def main():
    cov_path, noassert_path, src = sys.argv[1:4]
    with open(cov_path, encoding='utf-8') as f:
        cov = json.load(f)
    with open(noassert_path, encoding='utf-8') as f:
        noassert = {e['filename']: e for e in json.load(f)['files']}

    totals = []
    for entry in cov['files']:
        name = entry['file']
        with open(os.path.join(src, name), encoding='utf-8') as f:
            text = f.read().split('\n')
        funcs = sorted((fn['lineno'], fn['name'], fn['execution_count'])
                       for fn in entry['functions'])
        starts = [f[0] for f in funcs]
        per = {fn[1]: {'lines': [0, 0], 'branches': [0, 0], 'missed': [],
                       'partial': []} for fn in funcs}
        lhit = ltot = bhit = btot = 0
        for line in entry['lines']:
            if line['gcovr/noncode'] or line['gcovr/excluded']:
                continue
            no = line['line_number']
            i = bisect.bisect_right(starts, no) - 1
            fn = per[funcs[i][1]] if i >= 0 else None
            ltot += 1
            hit = line['count'] > 0
            lhit += hit
            taken = sum(1 for b in line['branches'] if b['count'] > 0)
            nb = len(line['branches'])
            btot += nb
            bhit += taken
            if fn is None:
                continue
            fn['lines'][0] += hit
            fn['lines'][1] += 1
            fn['branches'][0] += taken
            fn['branches'][1] += nb
            if not hit:
                fn['missed'].append(no)
            elif taken < nb:
                fn['partial'].append((no, taken, nb))

        print(f'== {name}')
        never = [f for f in funcs if f[2] == 0]
        print(f'functions never entered ({len(never)} of {len(funcs)}):')
        for lineno, fname, _ in never:
            p = per[fname]
            print(f'  {fname} (line {lineno}, {p["lines"][1]} lines, '
                  f'{p["branches"][1]} branches)')
        print('entered, with lines or branches not covered '
              '(lines hit/total, branches taken/total):')
        for lineno, fname, count in funcs:
            p = per[fname]
            if count == 0 or (not p['missed'] and not p['partial']):
                continue
            print(f'  {fname} (line {lineno}): lines {p["lines"][0]}/'
                  f'{p["lines"][1]}, branches {p["branches"][0]}/'
                  f'{p["branches"][1]}')
            if p['missed']:
                print(f'    lines never run: {ranges(p["missed"])}')
            for no, taken, nb in p['partial']:
                print(f'    {no}: {taken}/{nb} taken: '
                      f'{text[no - 1].strip()[:90]}')
        na = noassert.get(name, {})
        totals.append((name, lhit, ltot, bhit, btot,
                       na.get('branch_covered', 0), na.get('branch_total', 0),
                       len(funcs) - len(never), len(funcs)))
        print()

    print('== totals')
    sums = [0] * 8
    for t in totals:
        name, lh, lt, bh, bt, nh, nt, fh, ft = t
        for i, v in enumerate(t[1:]):
            sums[i] += v
        print(f'{name}: lines {lh}/{lt} ({pct(lh, lt)}), branches {bh}/{bt} '
              f'({pct(bh, bt)}), branches without assert() lines {nh}/{nt} '
              f'({pct(nh, nt)}), functions {fh}/{ft}')
    lh, lt, bh, bt, nh, nt, fh, ft = sums
    print(f'all: lines {lh}/{lt} ({pct(lh, lt)}), branches {bh}/{bt} '
          f'({pct(bh, bt)}), branches without assert() lines {nh}/{nt} '
          f'({pct(nh, nt)}), functions {fh}/{ft}')


if __name__ == '__main__':
    main()
