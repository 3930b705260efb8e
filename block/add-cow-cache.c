/*
 * add-cow bitmap cache
 *
 * Copyright (c) 2026 The add-cow authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * The bitmap is cached in fixed-size entries, each covering entry_bytes of
 * the on-disk bitmap (a multiple of 512 bytes).  Entries are evicted in LRU
 * order.  A dirty entry remembers the sector-aligned byte range that
 * changed, so write-back touches only those sectors.
 *
 * Ordering: setting a bit records that guest data was written to the image
 * file, but that data may still sit in a volatile write cache.  Before a
 * dirty entry reaches the .add-cow file, the image file is flushed, unless
 * a flush that started after the entry's last bit was set has completed
 * (the entry's generation against flushed_gen).  This is qcow2-cache's
 * depends_on_flush, except that the child flushed is the image file, not
 * the metadata file: flushing the file the bitmap lives in would order
 * nothing.
 *
 * Concurrency: every function here runs under the driver's s->lock, so
 * an entry pointer stays valid until the next call that may load or evict.
 * add_cow_cache_flush_image() alone drops that lock, around the flush.
 */

#include "qemu/osdep.h"
#include "qapi/error.h"
#include "qemu/bitmap.h"
#include "qemu/memalign.h"
#include "qemu/stats64.h"
#include "block/block-io.h"
#include "add-cow-cache.h"
#include "trace.h"

typedef struct AddCowCacheEntry {
    int64_t index;              /* entry number, -1 if the slot is free */
    unsigned long *bits;        /* host order, entry_bytes * 8 bits */
    bool dirty;
    uint32_t dirty_start;       /* dirty byte range, sector-aligned */
    uint32_t dirty_end;
    uint64_t gen;               /* set_gen of the last bit set while dirty */
    QTAILQ_ENTRY(AddCowCacheEntry) lru;
} AddCowCacheEntry;

struct AddCowCache {
    /*
     * The add-cow node, whose file child holds the bitmap.  Not the child
     * itself: blockdev-reopen may replace it with a new BdrvChild.
     */
    BlockDriverState *bs;
    /*
     * Flushed before a dirty entry is written.  blockdev-reopen cannot
     * replace it: only file and backing children can be changed.
     */
    BdrvChild *image;
    uint64_t bitmap_offset;
    uint64_t nb_clusters;
    uint32_t entry_bytes;
    int nb_entries;
    AddCowCacheEntry *entries;
    GHashTable *map;            /* &entry->index -> loaded entry */
    /* Every slot, most recently used first; free slots at the end */
    QTAILQ_HEAD(, AddCowCacheEntry) lru;
    AddCowCacheEntry *last;     /* most recently used entry, or NULL */
    void *buf;                  /* I/O bounce buffer, entry_bytes */
    /*
     * Every add_cow_cache_set() that sets bits takes a new generation; an
     * image file flush that starts when set_gen is G covers the data of
     * every bit of generation <= G, and moves flushed_gen up to G when it
     * completes.  A dirty entry with gen > flushed_gen must not be written.
     */
    uint64_t set_gen;
    uint64_t flushed_gen;
    uint64_t nb_allocated;      /* meaningful bits set, in memory */
    Stat64 allocated_pub;       /* nb_allocated, readable without lock */
};

static inline uint64_t entry_bits(AddCowCache *c)
{
    return (uint64_t)c->entry_bytes * 8;
}

/* Bytes of entry @index that lie inside the on-disk bitmap */
static uint32_t entry_disk_bytes(AddCowCache *c, int64_t index)
{
    uint64_t total = add_cow_bitmap_size(c->nb_clusters);
    uint64_t start = index * (uint64_t)c->entry_bytes;

    if (start >= total) {
        return 0;
    }
    return MIN(c->entry_bytes, total - start);
}

/* Number of valid bits (clusters) in entry @index */
static uint64_t entry_valid_bits(AddCowCache *c, int64_t index)
{
    uint64_t first = index * entry_bits(c);

    if (first >= c->nb_clusters) {
        return 0;
    }
    return MIN(entry_bits(c), c->nb_clusters - first);
}

AddCowCache *add_cow_cache_create(BlockDriverState *bs, BdrvChild *image,
                                  uint64_t bitmap_offset, uint64_t nb_clusters,
                                  uint32_t entry_bytes, uint64_t max_bytes)
{
    AddCowCache *c = g_new0(AddCowCache, 1);
    uint64_t n = max_bytes / entry_bytes;
    uint64_t needed = DIV_ROUND_UP(add_cow_bitmap_size(nb_clusters),
                                   entry_bytes);
    int i;

    assert(entry_bytes && QEMU_IS_ALIGNED(entry_bytes, BDRV_SECTOR_SIZE));

    /* Never more entries than the bitmap has, never fewer than the minimum */
    n = MIN(n, needed);
    n = MAX(n, ADD_COW_CACHE_MIN_ENTRIES);

    c->bs = bs;
    c->image = image;
    c->bitmap_offset = bitmap_offset;
    c->nb_clusters = nb_clusters;
    c->entry_bytes = entry_bytes;
    c->nb_entries = n;
    c->entries = g_new0(AddCowCacheEntry, n);
    c->map = g_hash_table_new(g_int64_hash, g_int64_equal);
    QTAILQ_INIT(&c->lru);
    for (i = 0; i < n; i++) {
        c->entries[i].index = -1;
        QTAILQ_INSERT_TAIL(&c->lru, &c->entries[i], lru);
    }
    return c;
}

void add_cow_cache_destroy(AddCowCache *c)
{
    int i;

    if (!c) {
        return;
    }
    for (i = 0; i < c->nb_entries; i++) {
        g_free(c->entries[i].bits);
    }
    g_hash_table_destroy(c->map);
    g_free(c->entries);
    qemu_vfree(c->buf);
    g_free(c);
}

bool add_cow_cache_is_dirty(AddCowCache *c)
{
    int i;

    for (i = 0; i < c->nb_entries; i++) {
        if (c->entries[i].dirty) {
            return true;
        }
    }
    return false;
}

static void *cache_buf(AddCowCache *c)
{
    if (!c->buf) {
        c->buf = qemu_blockalign(c->bs->file->bs, c->entry_bytes);
    }
    return c->buf;
}

/*
 * Flush the image file, which makes the data of every bit set before the
 * call stable.  Touches nothing in @c, so it may run without the lock.
 */
static int coroutine_fn GRAPH_RDLOCK cache_image_flush(AddCowCache *c)
{
    int ret;

    trace_add_cow_cache_image_flush(c);
    BLKDBG_CO_EVENT(c->bs->file, BLKDBG_IMAGE_FLUSH);
    ret = c->image ? bdrv_co_flush(c->image->bs) : 0;
    if (ret < 0) {
        return ret;
    }
    return 0;
}

/*
 * Make the image file's data stable before the bitmap write of @e, if it
 * may set bits for data that no completed flush covers.
 */
static int coroutine_fn GRAPH_RDLOCK
cache_flush_dependency(AddCowCache *c, AddCowCacheEntry *e)
{
    uint64_t gen = c->set_gen;
    int ret;

    if (e->gen <= c->flushed_gen) {
        return 0;
    }
    ret = cache_image_flush(c);
    if (ret == 0) {
        c->flushed_gen = MAX(c->flushed_gen, gen);
    }
    return ret;
}

/*
 * Flush the image file for the bits set so far with @lock, the driver's
 * lock that the caller holds, dropped meanwhile: requests that do not
 * depend on the flush (reads, writes to allocated clusters) go on instead
 * of waiting for an fsync.  Bits set while it runs are not covered; after
 * a few tries, add_cow_cache_write() flushes for them under the lock.
 */
int coroutine_fn GRAPH_RDLOCK
add_cow_cache_flush_image(AddCowCache *c, CoMutex *lock)
{
    int tries, ret;

    for (tries = 0; tries < 3 && c->set_gen > c->flushed_gen; tries++) {
        uint64_t gen = c->set_gen;

        qemu_co_mutex_unlock(lock);
        ret = cache_image_flush(c);
        qemu_co_mutex_lock(lock);
        if (ret < 0) {
            return ret;
        }
        c->flushed_gen = MAX(c->flushed_gen, gen);
    }
    return 0;
}

static int coroutine_fn GRAPH_RDLOCK
entry_writeback(AddCowCache *c, AddCowCacheEntry *e)
{
    uint32_t disk_bytes = entry_disk_bytes(c, e->index);
    uint32_t start = e->dirty_start;
    uint32_t end = MIN(e->dirty_end, disk_bytes);
    void *buf;
    int ret;

    if (!e->dirty) {
        return 0;
    }
    if (start >= end) {
        /* The dirty range lies past the end of a shrunk bitmap */
        e->dirty = false;
        return 0;
    }

    ret = cache_flush_dependency(c, e);
    if (ret < 0) {
        return ret;
    }

    buf = cache_buf(c);
    bitmap_to_le(buf, e->bits, entry_bits(c));
    trace_add_cow_cache_writeback(c, e->index, start, end - start);
    BLKDBG_CO_EVENT(c->bs->file, BLKDBG_BITMAP_UPDATE);
    ret = bdrv_co_pwrite(c->bs->file,
                         c->bitmap_offset + e->index * c->entry_bytes + start,
                         end - start, (uint8_t *)buf + start, 0);
    if (ret < 0) {
        /* Stays dirty: the next flush retries */
        return ret;
    }
    e->dirty = false;
    return 0;
}

/* Make @e a free slot, without writing it */
static void entry_forget(AddCowCache *c, AddCowCacheEntry *e)
{
    if (e->index >= 0) {
        g_hash_table_remove(c->map, &e->index);
        e->index = -1;
        QTAILQ_REMOVE(&c->lru, e, lru);
        QTAILQ_INSERT_TAIL(&c->lru, e, lru);
    }
    e->dirty = false;
    if (c->last == e) {
        c->last = NULL;
    }
}

/* Read entry @index from disk into the free slot @e */
static int coroutine_fn GRAPH_RDLOCK
entry_load(AddCowCache *c, AddCowCacheEntry *e, int64_t index)
{
    uint32_t disk_bytes = entry_disk_bytes(c, index);
    uint64_t valid = entry_valid_bits(c, index);
    void *buf = cache_buf(c);
    int ret;

    if (!e->bits) {
        e->bits = bitmap_new(entry_bits(c));
    }
    memset(buf, 0, c->entry_bytes);
    if (disk_bytes) {
        trace_add_cow_cache_load(c, index);
        BLKDBG_CO_EVENT(c->bs->file, BLKDBG_BITMAP_LOAD);
        ret = bdrv_co_pread(c->bs->file,
                            c->bitmap_offset + index * c->entry_bytes,
                            disk_bytes, buf, 0);
        if (ret < 0) {
            return ret;
        }
    }
    bitmap_from_le(e->bits, buf, entry_bits(c));

    /* Bits past the virtual disk are ignored on read (spec: padding) */
    if (valid < entry_bits(c)) {
        bitmap_clear(e->bits, valid, entry_bits(c) - valid);
    }
    e->index = index;
    e->dirty = false;
    g_hash_table_insert(c->map, &e->index, e);
    return 0;
}

/* Return the entry for @index, loading it (and evicting another) if needed */
static int coroutine_fn GRAPH_RDLOCK
cache_get(AddCowCache *c, int64_t index, AddCowCacheEntry **out)
{
    AddCowCacheEntry *e = c->last;
    int ret;

    /* Requests are mostly sequential: try the last entry used first */
    if (!e || e->index != index) {
        e = g_hash_table_lookup(c->map, &index);
    }
    if (!e) {
        e = QTAILQ_LAST(&c->lru);
        /*
         * An eviction that must wait for an image flush writes every dirty
         * entry that flush covers: the next evictions then cost no flush.
         */
        if (e->dirty && e->gen > c->flushed_gen) {
            ret = add_cow_cache_write(c);
        } else {
            ret = entry_writeback(c, e);
        }
        if (ret < 0) {
            return ret;
        }
        entry_forget(c, e);
        ret = entry_load(c, e, index);
        if (ret < 0) {
            return ret;
        }
    }
    QTAILQ_REMOVE(&c->lru, e, lru);
    QTAILQ_INSERT_HEAD(&c->lru, e, lru);
    c->last = e;
    *out = e;
    return 0;
}

static void entry_mark_dirty(AddCowCache *c, AddCowCacheEntry *e,
                             uint64_t first_bit, uint64_t nbits)
{
    uint32_t start = QEMU_ALIGN_DOWN(first_bit / 8, BDRV_SECTOR_SIZE);
    uint32_t end = ROUND_UP(DIV_ROUND_UP(first_bit + nbits, 8),
                            BDRV_SECTOR_SIZE);

    if (!e->dirty) {
        e->dirty = true;
        e->dirty_start = start;
        e->dirty_end = end;
    } else {
        e->dirty_start = MIN(e->dirty_start, start);
        e->dirty_end = MAX(e->dirty_end, end);
    }
}

/*
 * Return the number of clusters, starting at @cluster and at most @max, that
 * share the allocation state of @cluster; that state goes to *allocated.
 * Returns -errno if the bitmap cannot be read.
 */
int64_t coroutine_fn GRAPH_RDLOCK
add_cow_cache_get_run(AddCowCache *c, uint64_t cluster, uint64_t max,
                      bool *allocated)
{
    uint64_t end = MIN(cluster + max, c->nb_clusters);
    uint64_t pos = cluster;
    bool state = false;
    int ret;

    assert(cluster < c->nb_clusters && max > 0);

    while (pos < end) {
        int64_t index = pos / entry_bits(c);
        uint64_t base = index * entry_bits(c);
        uint64_t limit = MIN(end - base, entry_bits(c));
        uint64_t next;
        AddCowCacheEntry *e;

        ret = cache_get(c, index, &e);
        if (ret < 0) {
            return ret;
        }
        if (pos == cluster) {
            state = test_bit(pos - base, e->bits);
        }
        if (state) {
            next = find_next_zero_bit(e->bits, limit, pos - base);
        } else {
            next = find_next_bit(e->bits, limit, pos - base);
        }
        pos = base + next;
        if (next < limit) {
            break;
        }
    }

    *allocated = state;
    return MIN(pos, end) - cluster;
}

/*
 * Set (@allocated) or clear the bits of @count clusters from @cluster.
 * Setting a bit makes the next bitmap write wait for an image file flush,
 * so the caller must only set bits for data whose write has completed.
 */
int coroutine_fn GRAPH_RDLOCK
add_cow_cache_set(AddCowCache *c, uint64_t cluster, uint64_t count,
                  bool allocated)
{
    uint64_t end = cluster + count;
    int ret;

    assert(end <= c->nb_clusters);

    while (cluster < end) {
        int64_t index = cluster / entry_bits(c);
        uint64_t base = index * entry_bits(c);
        uint64_t n = MIN(end - cluster, base + entry_bits(c) - cluster);
        AddCowCacheEntry *e;

        ret = cache_get(c, index, &e);
        if (ret < 0) {
            return ret;
        }
        c->nb_allocated -= bitmap_count_one_with_offset(e->bits,
                                                         cluster - base, n);
        if (allocated) {
            bitmap_set(e->bits, cluster - base, n);
            e->gen = ++c->set_gen;
            c->nb_allocated += n;
        } else {
            bitmap_clear(e->bits, cluster - base, n);
        }
        stat64_set(&c->allocated_pub, c->nb_allocated);
        entry_mark_dirty(c, e, cluster - base, n);
        cluster += n;
    }
    return 0;
}

/* Set bits of existing clusters in the @len bitmap bytes @buf from @pos */
static uint64_t count_bytes(AddCowCache *c, const uint8_t *buf, uint64_t pos,
                            uint64_t len)
{
    uint64_t nb = c->nb_clusters;
    uint64_t full = nb / 8 > pos ? MIN(len, nb / 8 - pos) : 0;
    uint64_t i = 0, count = 0;

    for (; i + 8 <= full; i += 8) {
        count += ctpop64(ldq_le_p(buf + i));
    }
    for (; i < full; i++) {
        count += ctpop8(buf[i]);
    }
    if (i < len && nb % 8 && pos + i == nb / 8) {
        count += ctpop8(buf[i] & ((1U << (nb % 8)) - 1));
    }
    return count;
}

/*
 * Add the set bits of bitmap bytes [@pos, @end) on disk to *@count.
 * Holes in the .add-cow file (a new or mostly empty bitmap) are not read.
 */
static int coroutine_fn GRAPH_RDLOCK
count_on_disk(AddCowCache *c, uint64_t pos, uint64_t end, uint64_t *count)
{
    const uint64_t chunk = 1024 * 1024;
    uint8_t *buf = NULL;
    int64_t pnum;
    int ret = 0;

    for (; pos < end; pos += pnum) {
        ret = bdrv_co_block_status(c->bs->file->bs, c->bitmap_offset + pos,
                                   MIN(end - pos, chunk), &pnum, NULL, NULL);
        if (ret < 0 || !pnum) {
            /* pnum 0: past the end of the file, which reads zeros */
            break;
        }
        if (ret & BDRV_BLOCK_ZERO) {
            continue;
        }
        buf = buf ?: qemu_blockalign(c->bs->file->bs, chunk);
        ret = bdrv_co_pread(c->bs->file, c->bitmap_offset + pos, pnum, buf,
                            0);
        if (ret < 0) {
            break;
        }
        *count += count_bytes(c, buf, pos, pnum);
    }
    qemu_vfree(buf);
    return ret < 0 ? ret : 0;
}

static int cmp_index(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;

    return x < y ? -1 : x > y;
}

/*
 * Count the meaningful bits that are set: cached entries are
 * authoritative, the rest is read from disk in large requests, without
 * loading or evicting anything.  Done at open and after a shrink; every
 * add_cow_cache_set() keeps the count up to date in between.
 */
int coroutine_fn GRAPH_RDLOCK add_cow_cache_recount(AddCowCache *c)
{
    g_autofree int64_t *cached = g_new(int64_t, c->nb_entries + 1);
    uint64_t total = add_cow_bitmap_size(c->nb_clusters);
    uint64_t count = 0, pos = 0;
    int i, n = 0, ret;

    for (i = 0; i < c->nb_entries; i++) {
        AddCowCacheEntry *e = &c->entries[i];

        if (e->index >= 0) {
            count += bitmap_count_one(e->bits, entry_valid_bits(c, e->index));
            cached[n++] = e->index;
        }
    }
    qsort(cached, n, sizeof(*cached), cmp_index);
    cached[n] = DIV_ROUND_UP(total, c->entry_bytes);

    /* The byte ranges between cached entries */
    for (i = 0; i <= n; i++) {
        uint64_t end = MIN(cached[i] * (uint64_t)c->entry_bytes, total);

        if (pos < end) {
            ret = count_on_disk(c, pos, end, &count);
            if (ret < 0) {
                return ret;
            }
        }
        pos = MAX(pos, end + c->entry_bytes);
    }
    c->nb_allocated = count;
    stat64_set(&c->allocated_pub, count);
    return 0;
}

/* Meaningful bits set; may be called without the driver's lock */
uint64_t add_cow_cache_count(AddCowCache *c)
{
    return stat64_get(&c->allocated_pub);
}

/*
 * Write every dirty entry to the .add-cow file, flushing the image file
 * first if any of them may set a bit.  The .add-cow file itself is not
 * flushed here: the block layer flushes it after .bdrv_co_flush_to_os.
 * On error, the failed entry and all later ones stay dirty.
 */
int coroutine_fn GRAPH_RDLOCK add_cow_cache_write(AddCowCache *c)
{
    int i, ret;

    for (i = 0; i < c->nb_entries; i++) {
        ret = entry_writeback(c, &c->entries[i]);
        if (ret < 0) {
            return ret;
        }
    }
    return 0;
}

/* Forget every entry without writing it (after the bitmap was rewritten) */
static void cache_forget_all(AddCowCache *c)
{
    int i;

    for (i = 0; i < c->nb_entries; i++) {
        entry_forget(c, &c->entries[i]);
    }
}

/*
 * Clear every bit on disk and in the cache, and flush the .add-cow file
 * (emptying the image).  The node is drained: nothing sets a bit meanwhile.
 */
int GRAPH_RDLOCK add_cow_cache_zero_all(AddCowCache *c)
{
    int ret;

    ret = bdrv_pwrite_zeroes(c->bs->file, c->bitmap_offset,
                             add_cow_bitmap_size(c->nb_clusters), 0);
    /* After a failed write the disk may hold either state: reload */
    cache_forget_all(c);
    if (ret < 0) {
        return ret;
    }
    c->nb_allocated = 0;
    stat64_set(&c->allocated_pub, 0);
    return bdrv_flush(c->bs->file->bs);
}

/*
 * Shrink the geometry to @nb_clusters without I/O: the bits past the new
 * end are dropped from the cached entries, and entries past it are
 * forgotten.  The caller wrote the cache back before and clears those
 * bits on disk itself (they are padding there, which reads ignore).
 */
void add_cow_cache_truncate(AddCowCache *c, uint64_t nb_clusters)
{
    uint64_t valid;
    int i;

    c->nb_clusters = MIN(c->nb_clusters, nb_clusters);
    for (i = 0; i < c->nb_entries; i++) {
        AddCowCacheEntry *e = &c->entries[i];

        if (e->index < 0) {
            continue;
        }
        valid = entry_valid_bits(c, e->index);
        if (!valid) {
            c->nb_allocated -= bitmap_count_one(e->bits, entry_bits(c));
            entry_forget(c, e);
        } else if (valid < entry_bits(c)) {
            c->nb_allocated -= bitmap_count_one_with_offset(e->bits, valid,
                                                 entry_bits(c) - valid);
            bitmap_clear(e->bits, valid, entry_bits(c) - valid);
        }
    }
    c->last = NULL;
    stat64_set(&c->allocated_pub, c->nb_allocated);
}

/*
 * Grow to @nb_clusters.  The bits of the new clusters are cleared on disk
 * before this returns (stale bits may remain there from an earlier shrink,
 * and must never become visible); the caller writes the header with the
 * new size only afterwards.  Dirty entries are written first, under the
 * old geometry.  On failure the old geometry stays.
 */
int coroutine_fn GRAPH_RDLOCK
add_cow_cache_resize(AddCowCache *c, uint64_t nb_clusters)
{
    uint64_t old = c->nb_clusters;
    int64_t first, last;
    AddCowCacheEntry *e;
    int ret;

    ret = add_cow_cache_write(c);
    if (ret < 0) {
        return ret;
    }
    if (nb_clusters <= old) {
        add_cow_cache_truncate(c, nb_clusters);
        return 0;
    }

    /*
     * Growing: the entry holding the old end is reloaded under the old
     * geometry (which masks stale bits past the old end) and written back in
     * full under the new one; the rest of the new range is zeroed directly.
     */
    cache_forget_all(c);
    first = old / entry_bits(c);
    last = (nb_clusters - 1) / entry_bits(c);
    ret = cache_get(c, first, &e);
    if (ret < 0) {
        return ret;
    }
    c->nb_clusters = nb_clusters;
    entry_mark_dirty(c, e, 0, entry_bits(c));
    ret = entry_writeback(c, e);
    if (ret < 0) {
        c->nb_clusters = old;
        cache_forget_all(c);
        return ret;
    }
    if (last > first) {
        uint64_t start = (first + 1) * (uint64_t)c->entry_bytes;
        uint64_t end = add_cow_bitmap_size(nb_clusters);

        ret = bdrv_co_pwrite_zeroes(c->bs->file, c->bitmap_offset + start,
                                    end - start, 0);
        if (ret < 0) {
            c->nb_clusters = old;
            cache_forget_all(c);
            return ret;
        }
    }
    return 0;
}

/*
 * Clear, on disk, every bit from cluster @first up to byte @end of the
 * bitmap (padding bits, or bits past a shrunk bitmap), and flush.  The
 * cache must be clean; it masks such bits anyway, so it stays valid.
 */
int coroutine_fn GRAPH_RDLOCK
add_cow_cache_clear_from(AddCowCache *c, uint64_t first, uint64_t end)
{
    BdrvChild *file = c->bs->file;
    uint64_t first_byte = first / 8;
    uint64_t sector = QEMU_ALIGN_DOWN(first_byte, BDRV_SECTOR_SIZE);
    uint64_t rest = sector + BDRV_SECTOR_SIZE;
    uint8_t *buf;
    int ret;

    if (sector >= end) {
        return 0;
    }
    /* The sector holding bit @first keeps the bits before it */
    buf = qemu_blockalign(file->bs, BDRV_SECTOR_SIZE);
    ret = bdrv_co_pread(file, c->bitmap_offset + sector, BDRV_SECTOR_SIZE,
                        buf, 0);
    if (ret == 0) {
        uint64_t i = first_byte - sector;

        if (first % 8) {
            buf[i++] &= (1U << (first % 8)) - 1;
        }
        memset(buf + i, 0, BDRV_SECTOR_SIZE - i);
        ret = bdrv_co_pwrite(file, c->bitmap_offset + sector,
                             BDRV_SECTOR_SIZE, buf, 0);
    }
    qemu_vfree(buf);
    if (ret == 0 && rest < end) {
        ret = bdrv_co_pwrite_zeroes(file, c->bitmap_offset + rest,
                                    end - rest, 0);
    }
    if (ret == 0) {
        ret = bdrv_co_flush(file->bs);
    }
    return ret;
}

/* Account for the bitmap byte at @pos (bits from cluster @pos * 8) */
static void scan_byte(AddCowBitmapScan *sc, uint64_t nb, uint64_t pos,
                      uint8_t byte)
{
    uint64_t c0 = pos * 8;
    uint8_t mask = c0 >= nb ? 0 : nb - c0 >= 8 ? 0xff : (1U << (nb - c0)) - 1;
    uint8_t m = byte & mask;
    uint8_t p = byte & ~mask;

    if (p) {
        if (!sc->pad_set) {
            sc->first_pad = pos;
        }
        sc->pad_set += ctpop8(p);
    }
    if (m) {
        sc->allocated += ctpop8(m);
        sc->alloc_end = c0 + 8 - clz8(m);
    }
    if (m != mask && sc->first_clear == nb) {
        sc->first_clear = c0 + ctz32(~m & mask);
    }
}

/*
 * Read the bitmap as it is on disk, padding included, after writing the
 * cache back: the cache hides the padding bits, so it cannot be used to
 * check them (qemu-img check).
 */
int coroutine_fn GRAPH_RDLOCK
add_cow_cache_scan(AddCowCache *c, AddCowBitmapScan *sc)
{
    const uint64_t chunk = 1024 * 1024;
    uint64_t size = add_cow_bitmap_size(c->nb_clusters);
    uint64_t pos, len, i;
    uint8_t *buf;
    int ret;

    *sc = (AddCowBitmapScan) { .first_clear = c->nb_clusters };
    ret = add_cow_cache_write(c);
    if (ret < 0) {
        return ret;
    }
    buf = qemu_try_blockalign(c->bs->file->bs, MIN(chunk, size));
    if (!buf && size) {
        return -ENOMEM;
    }
    for (pos = 0; pos < size; pos += len) {
        len = MIN(chunk, size - pos);
        ret = bdrv_co_pread(c->bs->file, c->bitmap_offset + pos, len, buf, 0);
        if (ret < 0) {
            break;
        }
        for (i = 0; i < len; i++) {
            scan_byte(sc, c->nb_clusters, pos + i, buf[i]);
        }
    }
    qemu_vfree(buf);
    return ret;
}
