/*
 * add-cow: a copy-on-write bitmap over a raw image file
 *
 * Copyright (c) 2026 The add-cow authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Three files make up an add-cow disk (docs/specs/add-cow.txt):
 *
 *   .add-cow file (bs->file)       image file (s->image)     backing file
 *   +--------+------------------+  +---------------------+   +------------+
 *   | header | bitmap, 1 bit per|  | guest data at guest |   | any format |
 *   |        | cluster          |  | offsets (raw)       |   |            |
 *   +--------+------------------+  +---------------------+   +------------+
 *
 * A set bit means the cluster's data is in the image file; a clear bit
 * means it is read from the backing file (zeros past its end or without
 * one).  All header fields are little-endian on disk; the in-memory copy
 * in BDRVAddCowState is CPU-endian.
 *
 * Files, split by concern as QED's are:
 *   add-cow.c         open, close, reopen, the request path, resize and
 *                     the BlockDriver
 *   add-cow-cache.c   the bitmap: the only code that reads or writes its
 *                     bytes (add-cow-cache.h, which needs nothing from here)
 *   add-cow-header.c  header encoding, validation and updates, the names
 *   add-cow-check.c   qemu-img check and repair
 *   add-cow-create.c  create, measure and amend
 *
 * Write ordering: a bit is only set on disk after the cluster's data
 * (including the copy-on-write fill) was written to the image file and
 * the image file was flushed.  The bitmap cache enforces this.
 *
 * Locking: s->lock (a CoMutex) protects the header copy, the names, the
 * bitmap cache and s->inflight.  Cache calls, header writes and name
 * writes may yield with it held (they do I/O on the .add-cow file, and
 * the cache flushes the image file before writing a set bit when no
 * completed flush covers it).  A guest flush makes its image file flush
 * with the lock dropped (add_cow_cache_flush_image()), so that requests
 * that do not depend on it do not wait for an fsync.  Guest data I/O to
 * the image and backing files runs without the lock.  Bits are set only
 * after their data was written, by the allocating write that registered
 * the clusters in s->inflight; bits are cleared by discard (with its range
 * registered), shrink, and emptying (which drains the node).  Code outside
 * coroutines (close, amend, make_empty) runs with the node drained or not
 * yet shared, so nothing else holds the lock.  The allocated-cluster count
 * may be read without the lock (add_cow_cache_count()).
 */

#ifndef BLOCK_ADD_COW_H
#define BLOCK_ADD_COW_H

#include "block/block_int.h"
#include "qemu/coroutine.h"
#include "qemu/interval-tree.h"
#include "add-cow-cache.h"

#define ADD_COW_MAGIC           (('A') | ('C' << 8) | ('O' << 16) | \
                                 ((uint32_t)'W' << 24))

#define ADD_COW_MIN_CLUSTER_BITS    9
#define ADD_COW_MAX_CLUSTER_BITS    21
/*
 * The image file is identity-mapped, so the cluster size only sets the
 * bitmap's granularity: 4 KiB clusters need no copy-on-write for the
 * 4 KiB-aligned writes guests make (docs/add-cow-performance.md)
 */
#define ADD_COW_DEFAULT_CLUSTER_SIZE 4096

/* Header size written by QEMU: room for three names (see rebase). */
#define ADD_COW_DEFAULT_HEADER_SIZE (16 * 1024)
#define ADD_COW_MIN_HEADER_SIZE     512
#define ADD_COW_MAX_HEADER_SIZE     (1024 * 1024)
#define ADD_COW_NAME_AREA_START     128
#define ADD_COW_MAX_NAME_SIZE       4095
#define ADD_COW_FMT_SIZE            16

/* Compatible feature bits: none defined yet */
#define ADD_COW_COMPAT_MASK         0

/* Incompatible feature bits: none defined yet */
#define ADD_COW_INCOMPAT_MASK       0

/* Autoclear feature bits */
#define ADD_COW_AUTOCLEAR_ALL_ALLOCATED_BITNR 0
#define ADD_COW_AUTOCLEAR_ALL_ALLOCATED \
    (1ULL << ADD_COW_AUTOCLEAR_ALL_ALLOCATED_BITNR)
#define ADD_COW_AUTOCLEAR_MASK      ADD_COW_AUTOCLEAR_ALL_ALLOCATED

/*
 * The whole bitmap of a 1 TiB disk at 4 KiB clusters; entries are loaded on
 * first use, so a smaller disk or a less used one takes less memory
 */
#define ADD_COW_DEFAULT_CACHE_SIZE  (32 * 1024 * 1024)

#define ADD_COW_OPT_IMAGE_FILE      "image_file"
#define ADD_COW_OPT_IMAGE_FMT       "image_fmt"
#define ADD_COW_OPT_IMAGE_FILE_RAW  "image_file_raw"
#define ADD_COW_OPT_CACHE_SIZE      "cache-size"

/*
 * The fixed part of the header, at offset 0 of the .add-cow file.  It fits
 * in one 512-byte sector, so rewriting it is atomic: names are switched by
 * writing the new name elsewhere in the header first.
 */
typedef struct QEMU_PACKED AddCowHeader {
    uint32_t magic;                 /* ADD_COW_MAGIC, "ACOW" */
    uint32_t header_size;           /* bytes; multiple of 512 */
    uint32_t cluster_bits;          /* cluster size = 1 << cluster_bits */
    uint32_t reserved0;             /* must be zero */
    uint64_t incompatible_features;
    uint64_t compatible_features;
    uint64_t autoclear_features;
    uint64_t virtual_size;          /* bytes; multiple of 512 */
    uint64_t bitmap_offset;         /* bytes; >= header_size, 512-aligned */
    uint64_t bitmap_size;           /* bytes; see add_cow_bitmap_size() */
    uint32_t image_name_offset;     /* bytes from start of file */
    uint32_t image_name_size;       /* bytes, not NUL-terminated, >= 1 */
    uint32_t backing_name_offset;   /* 0 if no backing file */
    uint32_t backing_name_size;     /* 0 if no backing file */
    char image_format[ADD_COW_FMT_SIZE];   /* NUL-terminated, non-empty */
    char backing_format[ADD_COW_FMT_SIZE]; /* NUL-terminated; empty iff none */
    uint8_t reserved1[16];          /* must be zero */
} AddCowHeader;

QEMU_BUILD_BUG_ON(sizeof(AddCowHeader) != ADD_COW_NAME_AREA_START);

typedef struct BDRVAddCowState {
    BlockDriverState *bs;
    BdrvChild *image;               /* the image file (guest data) */
    bool image_overridden;          /* not the header's (image-file option) */

    /* Protected by lock: header copy, cache, inflight */
    CoMutex lock;
    AddCowHeader header;            /* CPU-endian */
    AddCowHeader unsure_header;     /* last header write, if it failed */
    bool header_unsure;             /* the disk may hold unsure_header */
    char *image_name;               /* as stored in the header */
    AddCowCache *cache;
    IntervalTreeRoot inflight;      /* AddCowReq: allocations, discards */

    /* Constant after open */
    uint32_t cluster_size;
    uint64_t nb_clusters;
    uint64_t cache_size;
} BDRVAddCowState;

static inline bool add_cow_all_allocated(BDRVAddCowState *s)
{
    return s->header.autoclear_features & ADD_COW_AUTOCLEAR_ALL_ALLOCATED;
}

/*
 * Unallocated clusters may read non-zero data: a backing file is attached,
 * or the header names one (a node opened with "backing": null must not
 * make zero writes that the next normal open would not see).
 */
static inline bool add_cow_has_backing(BlockDriverState *bs)
{
    BDRVAddCowState *s = bs->opaque;

    return bs->backing || s->header.backing_name_size;
}

/* add-cow.c */
int coroutine_fn GRAPH_RDLOCK add_cow_fill_unallocated(BlockDriverState *bs);

/* add-cow-header.c */
int coroutine_fn GRAPH_RDLOCK
add_cow_read_header(BlockDriverState *bs, Error **errp);
int coroutine_fn GRAPH_RDLOCK
add_cow_read_names(BlockDriverState *bs, Error **errp);
void add_cow_header_cpu_to_le(const AddCowHeader *cpu, AddCowHeader *le);
void add_cow_set_geometry(BDRVAddCowState *s);
int coroutine_mixed_fn GRAPH_RDLOCK
add_cow_update_header(BlockDriverState *bs, const AddCowHeader *h);
int coroutine_mixed_fn GRAPH_RDLOCK
add_cow_clear_unknown_autoclear(BlockDriverState *bs);
int coroutine_mixed_fn GRAPH_RDLOCK
add_cow_switch_name(BlockDriverState *bs, AddCowHeader *h, bool backing,
                    const char *name);
char *add_cow_name_path(const char *base, const char *name);
char * GRAPH_RDLOCK
add_cow_resolve(BlockDriverState *bs, const char *name, Error **errp);
char * GRAPH_RDLOCK add_cow_header_image_path(BlockDriverState *bs);
BlockDriverState *add_cow_local_file(BlockDriverState *bs);
bool add_cow_same_file(BlockDriverState *a, BlockDriverState *b);
bool add_cow_is_local_path(BlockDriverState *bs, const char *path);
bool GRAPH_RDLOCK
add_cow_names_itself(BlockDriverState *bs, const char *name);

/* add-cow-check.c */
int coroutine_fn GRAPH_RDLOCK
add_cow_co_check(BlockDriverState *bs, BdrvCheckResult *result,
                 BdrvCheckMode fix);

/* add-cow-create.c */
extern QemuOptsList add_cow_create_opts;
extern QemuOptsList add_cow_amend_opts;
int coroutine_fn GRAPH_UNLOCKED
add_cow_co_create(BlockdevCreateOptions *opts, Error **errp);
int coroutine_fn GRAPH_UNLOCKED
add_cow_co_create_opts(BlockDriver *drv, const char *filename,
                       QemuOpts *opts, Error **errp);
BlockMeasureInfo *add_cow_measure(QemuOpts *opts, BlockDriverState *in_bs,
                                  Error **errp);
int GRAPH_RDLOCK
add_cow_amend_options(BlockDriverState *bs, QemuOpts *opts,
                      BlockDriverAmendStatusCB *status_cb, void *cb_opaque,
                      bool force, Error **errp);

#endif /* BLOCK_ADD_COW_H */
