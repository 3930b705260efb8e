# SPDX-License-Identifier: GPL-2.0-or-later
#
# add-cow: a copy-on-write image format for QEMU, built as a patch over
# QEMU 10.2.2 (Debian's 1:10.2.2+ds-1 source package).

.PHONY: all build demo check check-generic check-qcow2-quick check-system \
        check-asan check-crash check-ops coverage fuzz bench docs series \
        clean distclean

all: build

build:
	@scripts/build.sh

# Set-up, then create an add-cow overlay, write through it, show the result
demo: build
	@scripts/demo.sh

# Every add-cow iotest, QEMU's generic quick group under -add-cow, and a
# real guest booted on add-cow (write + reboot, kill -9 crash)
check: build
	@scripts/run-iotests.sh "add-cow:-g add-cow" "add-cow:-g quick -x add-cow" \
	    "system:--quick"

# The whole generic iotests set under -add-cow (long)
check-generic: build
	@scripts/run-iotests.sh "add-cow:"

# The pristine baseline: QEMU's quick group with qcow2
check-qcow2-quick: build
	@scripts/run-iotests.sh "qcow2:-g quick"

# A real Linux guest on add-cow disks (boot, crash, stream, NBD backing)
check-system: build
	@scripts/guest/check-system.sh

# The crash-state checker with raised bounds, every workload at every
# cluster size (long)
check-crash: build
	@scripts/check-crash.sh

# The differential operation-sequence tester, add-cow against qcow2, for
# ADD_COW_OPS_MINUTES (default 20) or ADD_COW_OPS_SEQUENCES sequences,
# then its negative control (a driver mutant it must catch);
# ADD_COW_OPS_SEED=<seed> replays one sequence (long)
check-ops: build
	@scripts/check-ops.sh

# The add-cow iotests against an ASan+UBSan build
check-asan:
	@scripts/check-asan.sh

# Line and branch coverage of block/add-cow*.c by the add-cow iotests, from
# an --enable-gcov build in .build/gcov (docs/add-cow-testing-coverage.md)
coverage:
	@scripts/coverage.sh

# Coverage-guided fuzzing of the driver with libFuzzer for FUZZ_SECONDS
# (default 600), from seeds made by qemu-img; clang build in .build/fuzz
fuzz: build
	@scripts/fuzz.sh

# Every format (QED too with BENCH_ARGS="--formats all"), cache mode and
# workload, 5 interleaved runs, checked against issue 15's targets (about
# 1 h 40 min on 2 CPUs; the script prints its estimate first). BENCH_ARGS
# passes options, e.g. a smoke run:
# make bench BENCH_ARGS="--runs 1 --size 256 --touch 32 --tib-writes 1024
# --out /tmp/bench.md --png /tmp/bench.png"
bench: build
	@python3 scripts/bench.py $(BENCH_ARGS)

# QEMU's HTML manual with add-cow, Sphinx warnings as errors (.build/docs)
docs:
	@scripts/build-docs.sh

# The change as a git format-patch series against pristine QEMU 10.2.2
series: build
	@scripts/make-series.sh

clean:
	rm -rf .build/build .build/docs .build/demo .build/iotests-logs \
	    .build/iotests-scratch .build/gcov .build/fuzz .build/fuzz-work

distclean:
	rm -rf .build .cache out
