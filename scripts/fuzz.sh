#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Coverage-guided fuzzing of the add-cow driver with libFuzzer.  Used by
# "make fuzz"; docs/add-cow-testing-faults.md describes the harness.
#
# 1. Builds tests/unit/fuzz-add-cow-libfuzzer with clang in a build
#    directory of its own (.build/fuzz, same source tree .build/qemu),
#    configured with QEMU's --enable-fuzzing plus ASan and UBSan.  QEMU's
#    instrumentation filter (BUILD/instrumentation-filter, copied from
#    scripts/oss-fuzz/ at configure time) limits the coverage
#    instrumentation to device code; the lines of
#    scripts/fuzz-add-cow.allowlist are added to it, so that the feedback
#    (and libFuzzer's cov/ft counters) is the driver's.  (Passing the list
#    with --extra-cflags fails configure's compiler checks, which turn the
#    then unused flag into an error.)
# 2. Makes the seed corpus with qemu-img and qemu-io of the regular build:
#    valid images at every cluster size, with and without a backing file,
#    partly and fully written, all-allocated, bitmaps of one and of
#    several sectors.  Their headers name "seed.add-cow.img" and
#    "base.raw", the files the harness opens each input beside.
# 3. Runs libFuzzer for FUZZ_SECONDS (default 600) at nice 10, one
#    process, on the corpus .build/fuzz-corpus/work (kept between runs;
#    new inputs go there) and the seeds, and prints libFuzzer's figures.
#    A crash, leak or timeout leaves its input in .build/fuzz-artifacts/
#    and fails the run; reproduce it with
#      .build/fuzz/tests/unit/fuzz-add-cow-libfuzzer FILE
#    or, without clang, .build/build/tests/unit/fuzz-add-cow --dir DIR
#    --replay FILE.
#
# Usage: fuzz.sh [--build-only | --seeds-only] [libFuzzer options...]
# Environment: FUZZ_BUILD_DIR (default .build/fuzz), FUZZ_SECONDS, NICE.
# The line coverage the corpus reaches: scripts/coverage.sh --replay
# .build/fuzz-corpus/work .build/fuzz-corpus/seeds

set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
src=${QEMU_SRC:-$top/.build/qemu}
build=${FUZZ_BUILD_DIR:-$top/.build/fuzz}
seconds=${FUZZ_SECONDS:-600}
nice=${NICE:-10}
corpus=$top/.build/fuzz-corpus
artifacts=$top/.build/fuzz-artifacts
harness=$build/tests/unit/fuzz-add-cow-libfuzzer

mode=
case "${1:-}" in
--build-only|--seeds-only)
    mode=$1
    shift
    ;;
esac

build() {
    "$top/scripts/install-deps.sh"
    "$top/scripts/install-deps.sh" fuzz
    mkdir -p "$top/.build"
    (
        exec 9>"$top/.build/.build-lock"
        flock 9
        "$top/scripts/prepare-tree.sh"
    )
    if [ ! -f "$build/build.ninja" ]; then
        mkdir -p "$build"
        local cc=clang-14 cxx=clang++-14
        if command -v ccache >/dev/null 2>&1; then
            cc="ccache $cc"
            cxx="ccache $cxx"
        fi
        (cd "$build" && nice -n "$nice" "$src/configure" --cc="$cc" \
            --cxx="$cxx" --python=/usr/bin/python3 --disable-system \
            --enable-tools --disable-docs --disable-rust \
            --disable-install-blobs --enable-fuzzing --enable-asan \
            --enable-ubsan >configure.log 2>&1) || {
            tail -30 "$build/configure.log" >&2
            echo "fuzz: configure failed; see $build/configure.log" >&2
            rm -f "$build/build.ninja"
            exit 1
        }
    fi
    # A meson regeneration during the build copies the template again: the
    # driver's objects must come out instrumented, else they are rebuilt
    local try objs
    for try in 1 2; do
        if ! grep -q 'block/add-cow' "$build/instrumentation-filter"; then
            grep -v '^#' "$top/scripts/fuzz-add-cow.allowlist" \
                >>"$build/instrumentation-filter"
            rm -f "$build"/libblock.a.p/block_add-cow*.o
        fi
        nice -n "$nice" ninja --quiet -C "$build" \
            tests/unit/fuzz-add-cow-libfuzzer
        objs=$(ls "$build"/libblock.a.p/block_add-cow*.o)
        # (grep reads all: with -q, nm's SIGPIPE would fail the pipeline)
        # shellcheck disable=SC2086
        if nm $objs | grep __sanitizer_cov_8bit_counters_init >/dev/null
        then
            break
        fi
        [ "$try" = 1 ] || {
            echo "fuzz: block/add-cow*.c is not instrumented" >&2
            exit 1
        }
        rm -f $objs
    done
    [ -x "$harness" ] || {
        echo "fuzz: $harness was not built" >&2
        exit 1
    }
}

# The seeds, made by the regular build's tools (a copy, as run-iotests.sh
# takes one: a concurrent build may relink them)
make_seeds() {
    local bin n=0
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    bin=$tmp/bin
    mkdir -p "$bin"
    [ -x "$top/.build/build/qemu-img" ] || "$top/scripts/build.sh"
    (
        flock 9
        cp "$top/.build/build/qemu-img" "$top/.build/build/qemu-io" "$bin/"
    ) 9>"$top/.build/.build-lock"
    rm -rf "$corpus/seeds"
    mkdir -p "$corpus/seeds" "$corpus/work"

    # seed NAME CLUSTER_SIZE SIZE BACKING(0/1) QEMU-IO-COMMAND...
    seed() {
        local name=$1 cs=$2 size=$3 backing=$4 dir=$tmp/$1
        local -a b=()
        shift 4
        mkdir "$dir"
        if [ "$backing" = 1 ]; then
            local blen=$(( size < 4194304 ? size : 4194304 ))
            "$bin/qemu-img" create -q -f raw "$dir/base.raw" "$blen"
            "$bin/qemu-io" -f raw -c "write -P 0x42 0 $blen" \
                "$dir/base.raw" >/dev/null
            b=(-b base.raw -F raw)
        fi
        (cd "$dir" && "$bin/qemu-img" create -q -f add-cow \
            -o cluster_size="$cs" "${b[@]}" seed.add-cow "$size")
        local cmd
        for cmd in "$@"; do
            if [ "$cmd" = all-allocated ]; then
                "$bin/qemu-img" amend -f add-cow -o image_file_raw=on \
                    "$dir/seed.add-cow"
            else
                "$bin/qemu-io" -f add-cow -c "$cmd" "$dir/seed.add-cow" \
                    >/dev/null
            fi
        done
        "$bin/qemu-img" check -q -f add-cow "$dir/seed.add-cow"
        cp "$dir/seed.add-cow" "$corpus/seeds/$name.add-cow"
        n=$((n + 1))
    }

    local c
    for c in 512 1024 4096 16384 65536 262144 1048576 2097152; do
        local cs=$c
        if [ "$c" -ge 1048576 ]; then
            cs=$((c / 1048576))M
        elif [ "$c" -ge 1024 ]; then
            cs=$((c / 1024))k
        fi
        # 5.5 clusters, at least 64.5 KiB: a short last cluster
        local size=$(( c * 11 / 2 > 66048 ? c * 11 / 2 : 66048 ))
        size=$(( size / 512 * 512 ))
        # a partial write into cluster 1, a whole cluster 3
        local part="write -P 0x11 $((c + 512)) 512"
        local whole="write -P 0x33 $((3 * c)) $c"
        seed "c$cs-empty" "$c" "$size" 0
        seed "c$cs-written" "$c" "$size" 0 "$part" "$whole"
        seed "c$cs-backing" "$c" "$size" 1 "$part" "$whole"
        seed "c$cs-backing-zero" "$c" "$size" 1 "$part" \
            "write -z $((2 * c)) $c" "discard $((4 * c)) $c"
        seed "c$cs-full" "$c" "$size" 1 "write -P 0x66 0 $size"
        seed "c$cs-all-allocated" "$c" "$size" 0 "write -P 0x66 0 $size" \
            all-allocated
    done
    # Bitmaps of several sectors, the last one partly used
    seed "c512-4M-backing" 512 $((4 * 1024 * 1024 + 512)) 1 \
        "write -P 0x11 0 1536" "write -P 0x22 2097152 65536" \
        "write -P 0x33 4194304 512"
    seed "c4k-60M-sparse" 4096 $((60 * 1024 * 1024)) 0 \
        "write -P 0x11 0 4096" "write -P 0x22 $((59 * 1024 * 1024)) 8192"
    # A disk larger than the image file the harness provides (64 MiB):
    # clusters past its end read as zeros
    seed "c64k-1G-backing" 65536 $((1024 * 1024 * 1024)) 1 \
        "write -P 0x11 65536 4096"
    echo "fuzz: $n seed images in $corpus/seeds"
}

if [ "$mode" != --seeds-only ]; then
    build
    [ "$mode" = --build-only ] && exit 0
fi
make_seeds
[ "$mode" = --seeds-only ] && exit 0

work=$top/.build/fuzz-work
log=$artifacts/fuzz.log
rm -rf "$work"
mkdir -p "$work" "$artifacts"
echo "fuzz: libFuzzer for $seconds s (log: $log)"
status=0
# Leaks are checked per input by libFuzzer (LeakSanitizer); a UBSan report
# is fatal like an ASan one
ADD_COW_FUZZ_DIR=$work \
ASAN_OPTIONS=${ASAN_OPTIONS:-abort_on_error=1} \
UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1:abort_on_error=1} \
    nice -n "$nice" "$harness" -max_total_time="$seconds" -timeout=60 \
    -max_len=65536 -len_control=0 -print_final_stats=1 \
    -dict="$top/scripts/fuzz-add-cow.dict" -artifact_prefix="$artifacts/" \
    "$@" "$corpus/work" "$corpus/seeds" >"$log" 2>&1 || status=$?

grep -E '^#[0-9]+[[:space:]]+(INITED|DONE)' "$log" || true
grep -E '^(stat::|outcomes:|[0-9]+ executions)' "$log" || true
echo "fuzz: corpus: $(find "$corpus/work" -type f | wc -l) inputs in" \
     "$corpus/work"
if [ "$status" -ne 0 ]; then
    grep -E 'ERROR|SUMMARY|FAILURE|Test unit written' "$log" | head -20
    echo "fuzz: libFuzzer exited with status $status; see $log and" \
         "$artifacts/" >&2
    exit "$status"
fi
echo "fuzz: no crash, no sanitizer report"
