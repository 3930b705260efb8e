/*
 * libFuzzer's interface, for fuzz-add-cow.c built with -DADD_COW_LIBFUZZER
 *
 * Copyright (c) 2026 The add-cow authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#ifndef TESTS_UNIT_FUZZ_ADD_COW_H
#define TESTS_UNIT_FUZZ_ADD_COW_H

/* Called by libFuzzer */
int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
size_t LLVMFuzzerCustomMutator(uint8_t *data, size_t size, size_t max_size,
                               unsigned int seed);

/* Provided by libFuzzer: its own mutations */
size_t LLVMFuzzerMutate(uint8_t *data, size_t size, size_t max_size);

#endif
