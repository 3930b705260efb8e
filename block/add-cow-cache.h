/*
 * add-cow bitmap cache: the one module that knows the bitmap's layout
 *
 * Copyright (c) 2026 The add-cow authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * The bitmap starts at a 512-aligned offset of the .add-cow file and has
 * one bit per cluster, least significant bit first (bit n of the bitmap is
 * bit n % 8 of byte n / 8); it is padded to a multiple of 512 bytes, and
 * padding bits are ignored on read.  Everything that reads or writes those
 * bytes goes through the functions below.  All of them, except
 * add_cow_cache_count(), run under the driver's lock or with the node
 * drained.
 */

#ifndef BLOCK_ADD_COW_CACHE_H
#define BLOCK_ADD_COW_CACHE_H

#include "block/block_int.h"
#include "qemu/coroutine.h"

#define ADD_COW_CACHE_MIN_ENTRIES   4

/* Number of bytes the bitmap of @nb_clusters clusters takes on disk */
static inline uint64_t add_cow_bitmap_size(uint64_t nb_clusters)
{
    return ROUND_UP(DIV_ROUND_UP(nb_clusters, 8), BDRV_SECTOR_SIZE);
}

typedef struct AddCowCache AddCowCache;

/* What a scan of the on-disk bitmap found (add_cow_cache_scan()) */
typedef struct AddCowBitmapScan {
    uint64_t allocated;         /* meaningful bits set */
    uint64_t first_clear;       /* first meaningful bit clear, or nb_clusters */
    uint64_t alloc_end;         /* last meaningful bit set + 1, or 0 */
    uint64_t pad_set;           /* padding bits set */
    uint64_t first_pad;         /* byte of the first padding bit set */
} AddCowBitmapScan;

AddCowCache *add_cow_cache_create(BlockDriverState *bs, BdrvChild *image,
                                  uint64_t bitmap_offset, uint64_t nb_clusters,
                                  uint32_t entry_bytes, uint64_t max_bytes);
void add_cow_cache_destroy(AddCowCache *c);

/* Lookups and updates */
int64_t coroutine_fn GRAPH_RDLOCK
add_cow_cache_get_run(AddCowCache *c, uint64_t cluster, uint64_t max,
                      bool *allocated);
int coroutine_fn GRAPH_RDLOCK
add_cow_cache_set(AddCowCache *c, uint64_t cluster, uint64_t count,
                  bool allocated);
uint64_t add_cow_cache_count(AddCowCache *c);
int coroutine_fn GRAPH_RDLOCK add_cow_cache_recount(AddCowCache *c);

/* Write-back, with the image file flush it depends on */
int coroutine_fn GRAPH_RDLOCK
add_cow_cache_flush_image(AddCowCache *c, CoMutex *lock);
int coroutine_fn GRAPH_RDLOCK add_cow_cache_write(AddCowCache *c);
bool add_cow_cache_is_dirty(AddCowCache *c);

/* Geometry changes and whole-bitmap operations */
int coroutine_fn GRAPH_RDLOCK
add_cow_cache_resize(AddCowCache *c, uint64_t nb_clusters);
void add_cow_cache_truncate(AddCowCache *c, uint64_t nb_clusters);
int coroutine_fn GRAPH_RDLOCK
add_cow_cache_clear_from(AddCowCache *c, uint64_t first, uint64_t end);
int GRAPH_RDLOCK add_cow_cache_zero_all(AddCowCache *c);
int coroutine_fn GRAPH_RDLOCK
add_cow_cache_scan(AddCowCache *c, AddCowBitmapScan *sc);

#endif /* BLOCK_ADD_COW_CACHE_H */
