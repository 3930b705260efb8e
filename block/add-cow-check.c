/*
 * add-cow image check and repair (qemu-img check)
 *
 * Copyright (c) 2026 The add-cow authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * The header was validated by open (an image that breaks a field rule
 * does not open at all), and open also found the image file and the
 * backing file, so what is left are the conditions a reader tolerates:
 *
 *  - padding bits set past the last cluster (a reader ignores them, but a
 *    later grow must not see them): leaks, repaired by clearing them;
 *  - the all-allocated flag set over a clear bit: repaired by setting the
 *    bits, because reads follow the flag (see
 *    add_cow_repair_all_allocated());
 *  - an image file that ends before an allocated cluster does (that data
 *    reads as zeros, it is lost): repaired by extending the image file to
 *    the virtual size, which makes the loss explicit but keeps the reads;
 *    an image file shorter than the virtual size without allocated data
 *    past its end is only a warning (writes extend it), -r all extends it.
 *
 * Everything is reported on stderr, prefixed with ERROR, Warning or
 * Repairing like the other drivers do.
 */

#include "qemu/osdep.h"
#include "block/block_int.h"
#include "block/block-io.h"
#include "qapi/error.h"
#include "add-cow.h"

/*
 * The all-allocated flag is set over clear bits.  The flag is the side to
 * trust: a writer sets it only after every bit is on disk, and while it is
 * set reads come from the image file, so setting the missing bits keeps
 * what the guest sees.  The image file is flushed before the bits are
 * written (the cache's flush dependency), as for any allocation.
 */
static int coroutine_fn GRAPH_RDLOCK
add_cow_repair_all_allocated(BlockDriverState *bs)
{
    BDRVAddCowState *s = bs->opaque;
    int ret;

    ret = add_cow_cache_set(s->cache, 0, s->nb_clusters, true);
    if (ret == 0) {
        ret = add_cow_cache_write(s->cache);
    }
    if (ret == 0) {
        ret = bdrv_co_flush(bs->file->bs);
    }
    return ret;
}

/*
 * Set padding bits are harmless to readers and are what a crash between a
 * shrink's header update and its bit clearing leaves behind, or a grow
 * that zero-filled the new area (and set its bits) but failed or crashed
 * before its header update; a later grow clears them.  So they count as
 * leaks (like qcow2's leaked clusters), not corruption.
 */
static int coroutine_fn GRAPH_RDLOCK
add_cow_check_padding(BlockDriverState *bs, const AddCowBitmapScan *sc,
                      BdrvCheckResult *result, bool repair)
{
    BDRVAddCowState *s = bs->opaque;
    int ret;

    if (!sc->pad_set) {
        return 0;
    }
    fprintf(stderr, "%s %" PRIu64 " bitmap bit(s) past the last cluster "
            "(%" PRIu64 ") are set, the first in bitmap byte %" PRIu64 "\n",
            repair ? "Repairing" : "Leaked", sc->pad_set,
            s->nb_clusters ? s->nb_clusters - 1 : 0, sc->first_pad);
    if (!repair) {
        result->leaks += sc->pad_set;
        return 0;
    }
    ret = add_cow_cache_clear_from(s->cache, s->nb_clusters,
                                   s->header.bitmap_size);
    if (ret < 0) {
        fprintf(stderr, "ERROR cannot clear the padding bits: %s\n",
                strerror(-ret));
        return ret;
    }
    result->leaks_fixed += sc->pad_set;
    return 0;
}

static int coroutine_fn GRAPH_RDLOCK
add_cow_check_flag(BlockDriverState *bs, const AddCowBitmapScan *sc,
                   BdrvCheckResult *result, bool repair)
{
    BDRVAddCowState *s = bs->opaque;
    int ret;

    if (!add_cow_all_allocated(s) || sc->first_clear >= s->nb_clusters) {
        return 0;
    }
    fprintf(stderr, "%s all-allocated flag is set, but %" PRIu64
            " cluster(s) are not allocated in the bitmap (the first is "
            "cluster %" PRIu64 ")%s\n", repair ? "Repairing" : "ERROR",
            s->nb_clusters - sc->allocated, sc->first_clear,
            repair ? ": setting their bits, reads keep coming from the "
            "image file" : "");
    if (!repair) {
        result->corruptions++;
        return 0;
    }
    ret = add_cow_repair_all_allocated(bs);
    if (ret < 0) {
        fprintf(stderr, "ERROR cannot set the bits: %s\n", strerror(-ret));
        return ret;
    }
    result->corruptions_fixed++;
    return 0;
}

/*
 * An image file that ends before an allocated cluster does lost that data
 * (it reads zeros); one that is only shorter than the virtual size is fine.
 * Repair extends it, which keeps exactly the reads.
 */
static int coroutine_fn GRAPH_RDLOCK
add_cow_check_image_len(BlockDriverState *bs, const AddCowBitmapScan *sc,
                        BdrvCheckResult *result, bool repair)
{
    BDRVAddCowState *s = bs->opaque;
    uint64_t size = s->header.virtual_size;
    /* Reads trust the flag while it is set */
    uint64_t alloc_end = add_cow_all_allocated(s) ? size :
                         MIN(sc->alloc_end << s->header.cluster_bits, size);
    int64_t image_len = s->image ? bdrv_co_getlength(s->image->bs) :
                        INT64_MAX;
    int ret;

    if (image_len < 0) {
        fprintf(stderr, "ERROR cannot get the image file length: %s\n",
                strerror(-image_len));
        return image_len;
    }
    if (image_len < alloc_end) {
        fprintf(stderr, "%s image file is %" PRId64 " bytes long, but "
                "allocated clusters reach up to %" PRIu64 " (cluster %"
                PRIu64 "): their data past the end of the image file is "
                "lost and reads as zeros%s\n", repair ? "Repairing" : "ERROR",
                image_len, alloc_end,
                (alloc_end - 1) >> s->header.cluster_bits,
                repair ? "; extending the image file to the virtual size" :
                "");
    } else if (image_len < size) {
        fprintf(stderr, "%s image file is %" PRId64 " bytes long, shorter "
                "than the virtual size (%" PRIu64 ")%s\n",
                repair ? "Repairing" : "Warning:", image_len, size,
                repair ? ": extending it" : "; no allocated cluster lies "
                "past its end");
    }
    if (image_len >= size || !repair) {
        result->corruptions += image_len < alloc_end;
        return 0;
    }
    ret = bdrv_co_truncate(s->image, size, false, PREALLOC_MODE_OFF, 0, NULL);
    if (ret == 0) {
        ret = bdrv_co_flush(s->image->bs);
    }
    if (ret < 0) {
        fprintf(stderr, "ERROR cannot extend the image file: %s\n",
                strerror(-ret));
        return ret;
    }
    result->corruptions_fixed += image_len < alloc_end;
    return 0;
}

int coroutine_fn GRAPH_RDLOCK
add_cow_co_check(BlockDriverState *bs, BdrvCheckResult *result,
                 BdrvCheckMode fix)
{
    BDRVAddCowState *s = bs->opaque;
    AddCowBitmapScan sc;
    int ret;

    qemu_co_mutex_lock(&s->lock);
    ret = add_cow_cache_write(s->cache);
    if (ret < 0) {
        fprintf(stderr, "ERROR cannot write the bitmap cache: %s\n",
                strerror(-ret));
        goto out;
    }
    ret = add_cow_cache_scan(s->cache, &sc);
    if (ret < 0) {
        fprintf(stderr, "ERROR cannot read the bitmap: %s\n", strerror(-ret));
        goto out;
    }
    ret = add_cow_check_padding(bs, &sc, result, fix & BDRV_FIX_LEAKS);
    if (ret == 0) {
        ret = add_cow_check_flag(bs, &sc, result, fix & BDRV_FIX_ERRORS);
    }
    if (ret == 0) {
        ret = add_cow_check_image_len(bs, &sc, result,
                                      fix & BDRV_FIX_ERRORS);
    }
    if (ret < 0) {
        goto out;
    }

    result->bfi.total_clusters = s->nb_clusters;
    result->bfi.allocated_clusters = add_cow_all_allocated(s) ?
                                     s->nb_clusters : sc.allocated;
    result->image_end_offset = s->header.bitmap_offset +
                               s->header.bitmap_size;

out:
    if (ret < 0) {
        result->check_errors++;
    }
    qemu_co_mutex_unlock(&s->lock);
    return ret;
}
