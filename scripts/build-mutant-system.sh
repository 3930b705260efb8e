#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# A mutant of the add-cow driver (see scripts/build-mutant.sh) with a
# qemu-system-x86_64 as well, for the operation-sequence tester, which
# drives block jobs, reopens and snapshots over QMP.  build-mutant.sh
# compiles the mutant's driver objects and links qemu-img and qemu-io;
# this links qemu-system-x86_64 from the build's objects with the
# mutant's driver objects in place of the driver's, the way ninja links
# it (the command line is taken from build.ninja, whose link rule passes
# it in a response file).  Only the link runs: about a minute.
#
# Usage: build-mutant-system.sh NAME
# Prints the directory holding qemu-img, qemu-io and qemu-system-x86_64
# (and a qemu-bundle link for the firmware):
# $BUILD_DIR/add-cow-mutants/NAME/system.
#
# Environment: BUILD_DIR (default .build/build, already built), QEMU_SRC.

set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
build=$(cd "${BUILD_DIR:-$top/.build/build}" && pwd)
name=${1:?usage: build-mutant-system.sh NAME}

bin=$("$top/scripts/build-mutant.sh" "$name" | tail -1)
dir=${bin%/bin}
[ -x "$bin/qemu-img" ] || { echo "build-mutant-system: no $bin" >&2; exit 1; }

exec 9>"$top/.build/.build-lock"
flock 9
[ -x "$build/qemu-system-x86_64" ] || {
    echo "build-mutant-system: $build/qemu-system-x86_64 is missing" >&2
    exit 1
}
sys=$dir/system
stamp=$( (cat "$dir/stamp" "$dir"/obj/*.o; ls -l --time-style=+%s \
          "$build/qemu-system-x86_64") | sha256sum)
if [ -x "$sys/qemu-system-x86_64" ] &&
   [ "$(cat "$sys/stamp" 2>/dev/null)" = "$stamp" ]; then
    echo "$sys"
    exit 0
fi
rm -rf "$sys" "$sys.tmp"
mkdir -p "$sys.tmp"

# The link statement of qemu-system-x86_64 in build.ninja: the rule is
# "cc -m64 @$out.rsp" with "$ARGS -o $out $in $LINK_ARGS" in the file
python3 - "$build/build.ninja" "$dir/obj" "$sys.tmp" <<'EOF'
import os
import re
import sys

ninja, objdir, out = sys.argv[1:]


def split(text):
    """Split a ninja line on unescaped blanks, unescaping $$, $ and $:"""
    words, cur, i = [], '', 0
    while i < len(text):
        c = text[i]
        if c == '$' and i + 1 < len(text):
            cur += text[i + 1]
            i += 2
            continue
        if c == ' ':
            if cur:
                words.append(cur)
            cur = ''
        else:
            cur += c
        i += 1
    if cur:
        words.append(cur)
    return words


with open(ninja, encoding='utf-8') as f:
    lines = f.read().split('\n')
start = [i for i, line in enumerate(lines)
         if line.startswith('build qemu-system-x86_64: ')]
if len(start) != 1:
    sys.exit('build-mutant-system: no single link statement in build.ninja')
words = split(lines[start[0]])
if words[2] != 'c_LINKER_RSP':
    sys.exit(f'build-mutant-system: unexpected link rule {words[2]}')
ins = []
for w in words[3:]:
    if w in ('|', '||', '|@'):
        break
    ins.append(w)
var = {}
for line in lines[start[0] + 1:]:
    m = re.match(r'^ (\w+) = (.*)$', line)
    if not m:
        break
    var[m.group(1)] = m.group(2)
mutants = set(os.listdir(objdir))
replaced = 0
for i, w in enumerate(ins):
    base = os.path.basename(w)
    if re.match(r'^libblock\.a\.p/block_add-cow[^/]*\.c\.o$', w) and \
            base in mutants:
        ins[i] = os.path.join(objdir, base)
        replaced += 1
if replaced != len(mutants):
    sys.exit(f'build-mutant-system: replaced {replaced} of '
             f'{len(mutants)} driver objects')
args = split(var.get('ARGS', '')) + ['-o', os.path.join(
    out, 'qemu-system-x86_64')] + ins + split(var.get('LINK_ARGS', ''))
with open(os.path.join(out, 'link.rsp'), 'w', encoding='utf-8') as f:
    f.write(' '.join(a.replace('\\', '\\\\').replace(' ', '\\ ')
                     for a in args))
EOF

(cd "$build" && cc -m64 @"$sys.tmp/link.rsp") >"$sys.tmp/link.log" 2>&1 || {
    cat "$sys.tmp/link.log" >&2
    echo "build-mutant-system: mutant $name: qemu-system-x86_64 does" \
         "not link" >&2
    exit 1
}
ln -s ../bin/qemu-img ../bin/qemu-io "$sys.tmp/"
ln -s "$build/qemu-bundle" "$sys.tmp/qemu-bundle"
echo "$stamp" >"$sys.tmp/stamp"
mv "$sys.tmp" "$sys"
echo "$sys"
