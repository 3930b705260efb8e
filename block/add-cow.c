/*
 * add-cow: a copy-on-write bitmap over a raw image file
 *
 * Copyright (c) 2026 The add-cow authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * See block/add-cow.h for the layout and docs/specs/add-cow.txt for the
 * normative format description.
 *
 * Request pipeline:
 *  - reads look up runs of allocated/unallocated clusters in the bitmap
 *    cache (under s->lock) and issue one vectored request per run to the
 *    image file or the backing file;
 *  - writes to allocated clusters go straight to the image file;
 *  - an allocating write registers its cluster-aligned range in s->inflight
 *    (overlapping allocations wait for each other), writes head fill + guest
 *    data + tail fill to the image file in one request, and only then sets
 *    the bits in the cache.  The cache flushes the image file before it
 *    writes any of those bits, so many allocations share one image flush.
 */

#include "qemu/osdep.h"
#include "block/block_int.h"
#include "block/block-io.h"
#include "block/qdict.h"
#include "qapi/error.h"
#include "qobject/qdict.h"
#include "qemu/bswap.h"
#include "qemu/cutils.h"
#include "qemu/error-report.h"
#include "qemu/memalign.h"
#include "qemu/module.h"
#include "qemu/option.h"
#include "qemu/main-loop.h"
#include "add-cow.h"
#include "trace.h"

static QemuOptsList add_cow_runtime_opts = {
    .name = "add-cow",
    .head = QTAILQ_HEAD_INITIALIZER(add_cow_runtime_opts.head),
    .desc = {
        {
            .name = ADD_COW_OPT_CACHE_SIZE,
            .type = QEMU_OPT_SIZE,
            .help = "Maximum bitmap cache size",
        },
        { /* end of list */ }
    },
};

static int add_cow_probe(const uint8_t *buf, int buf_size,
                         const char *filename)
{
    if (buf_size < 4) {
        return 0;
    }
    return ldl_le_p(buf) == ADD_COW_MAGIC ? 100 : 0;
}

static int coroutine_fn GRAPH_UNLOCKED
add_cow_open_image(BlockDriverState *bs, QDict *options, Error **errp)
{
    ERRP_GUARD();
    BDRVAddCowState *s = bs->opaque;
    g_autofree char *dir = NULL;
    g_autofree char *path = NULL;

    /* Options given by the user (e.g. -blockdev node reference) win */
    s->image = bdrv_co_open_child(NULL, options, "image-file", bs,
                                  &child_of_bds, BDRV_CHILD_DATA, true, errp);
    if (*errp) {
        return -EINVAL;
    }
    if (s->image) {
        s->image_overridden = true;
        return 0;
    }

    /* Otherwise the header's name, relative to the .add-cow file's dir */
    if (path_is_absolute(s->image_name)) {
        path = g_strdup(s->image_name);
    } else {
        bdrv_graph_co_rdlock();
        dir = bdrv_dirname(bs->file->bs, errp);
        bdrv_graph_co_rdunlock();
        if (!dir) {
            error_prepend(errp, "Cannot resolve the relative image file name "
                          "'%s': ", s->image_name);
            return -EINVAL;
        }
        path = g_strconcat(dir, s->image_name, NULL);
    }

    /* Never open the .add-cow file a second time as its own image file */
    bdrv_graph_co_rdlock();
    if (add_cow_is_local_path(bs->file->bs, path)) {
        bdrv_graph_co_rdunlock();
        error_setg(errp, "The image file '%s' of '%s' is the add-cow file "
                   "itself", s->image_name, bs->file->bs->filename);
        return -EINVAL;
    }
    bdrv_graph_co_rdunlock();

    /* bdrv_co_open_child() does not parse json: or protocol prefixes */
    s->image = bdrv_co_open_child(path, options, "image-file", bs,
                                  &child_of_bds, BDRV_CHILD_DATA, false,
                                  errp);
    if (!s->image) {
        error_prepend(errp, "Could not open the add-cow image file '%s': ",
                      path);
        return -EINVAL;
    }
    return 0;
}

/*
 * The image file must not be the .add-cow file: guest data would overwrite
 * the header and the bitmap.
 */
static int GRAPH_RDLOCK add_cow_check_image(BlockDriverState *bs,
                                            Error **errp)
{
    BDRVAddCowState *s = bs->opaque;
    BlockDriverState *p;

    if (s->image && add_cow_same_file(bs->file->bs, s->image->bs)) {
        error_setg(errp, "The image file '%s' of '%s' is the add-cow file "
                   "itself", s->image_name, bs->file->bs->filename);
        return -EINVAL;
    }
    /* A backing chain that comes back to this file would never end */
    for (p = bs->inherits_from; p; p = p->inherits_from) {
        if (p->file && add_cow_same_file(p->file->bs, bs->file->bs)) {
            error_setg(errp, "Backing chain loop: '%s' is part of its own "
                       "backing chain", bs->file->bs->filename);
            return -ELOOP;
        }
    }
    return 0;
}

static int add_cow_parse_runtime(BlockDriverState *bs, QDict *options,
                                 Error **errp)
{
    BDRVAddCowState *s = bs->opaque;
    g_autoptr(QemuOpts) opts = NULL;

    opts = qemu_opts_create(&add_cow_runtime_opts, NULL, 0, &error_abort);
    if (!qemu_opts_absorb_qdict(opts, options, errp)) {
        return -EINVAL;
    }
    s->cache_size = qemu_opt_get_size(opts, ADD_COW_OPT_CACHE_SIZE,
                                      ADD_COW_DEFAULT_CACHE_SIZE);
    if (s->cache_size > INT64_MAX / 2) {
        error_setg(errp, "add-cow cache-size is too large");
        return -EINVAL;
    }
    return 0;
}

/* Open the image file child.  Called with the graph read-locked. */
static int coroutine_fn GRAPH_RDLOCK
add_cow_open_image_child(BlockDriverState *bs, QDict *options, int flags,
                         Error **errp)
{
    int ret = 0;

    if (flags & BDRV_O_NO_IO) {
        /*
         * Like qcow2's data file: qemu-img info must be able to inspect an
         * untrusted image without opening the file its header names.
         */
        qdict_extract_subqdict(options, NULL, "image-file.");
        qdict_del(options, "image-file");
    } else {
        bdrv_graph_co_rdunlock();
        ret = add_cow_open_image(bs, options, errp);
        bdrv_graph_co_rdlock();
        if (ret == 0) {
            ret = add_cow_check_image(bs, errp);
        }
    }
    return ret;
}

static int coroutine_fn GRAPH_RDLOCK
add_cow_do_open(BlockDriverState *bs, QDict *options, int flags,
                bool open_image, Error **errp)
{
    BDRVAddCowState *s = bs->opaque;
    uint32_t entry_bytes;
    int ret;

    ret = add_cow_parse_runtime(bs, options, errp);
    if (ret < 0) {
        return ret;
    }

    ret = add_cow_read_header(bs, errp);
    if (ret == 0) {
        ret = add_cow_read_names(bs, errp);
    }
    if (ret < 0) {
        return ret;
    }

    bs->total_sectors = s->header.virtual_size / BDRV_SECTOR_SIZE;
    bs->supported_zero_flags = BDRV_REQ_MAY_UNMAP | BDRV_REQ_NO_FALLBACK;
    bs->supported_truncate_flags = BDRV_REQ_ZERO_WRITE;

    if (open_image) {
        ret = add_cow_open_image_child(bs, options, flags, errp);
        if (ret < 0) {
            return ret;
        }
    }

    /* The .add-cow file holds no guest data */
    bs->file->role &= ~BDRV_CHILD_DATA;
    bdrv_child_refresh_perms(bs, bs->file, &error_abort);

    entry_bytes = MIN(MAX(s->cluster_size, 4096), 65536);
    s->cache = add_cow_cache_create(bs, s->image,
                                    s->header.bitmap_offset, s->nb_clusters,
                                    entry_bytes, s->cache_size);
    s->inflight = (IntervalTreeRoot) {};
    ret = add_cow_cache_recount(s->cache);
    if (ret < 0) {
        error_setg_errno(errp, -ret, "Could not read the add-cow bitmap");
        return ret;
    }

    if ((flags & BDRV_O_RDWR) && !(flags & BDRV_O_INACTIVE)) {
        ret = add_cow_clear_unknown_autoclear(bs);
        if (ret < 0) {
            error_setg_errno(errp, -ret, "Could not clear unknown autoclear "
                             "features");
            return ret;
        }
    }
    return 0;
}

static void add_cow_free_state(BDRVAddCowState *s)
{
    add_cow_cache_destroy(s->cache);
    s->cache = NULL;
    g_free(s->image_name);
    s->image_name = NULL;
}

static void coroutine_fn GRAPH_UNLOCKED
add_cow_unref_image(BlockDriverState *bs)
{
    BDRVAddCowState *s = bs->opaque;

    if (s->image) {
        bdrv_drain_all_begin();
        bdrv_co_unref_child(bs, s->image);
        bdrv_drain_all_end();
        s->image = NULL;
    }
}

typedef struct AddCowOpenCo {
    BlockDriverState *bs;
    QDict *options;
    int flags;
    Error **errp;
    int ret;
} AddCowOpenCo;

static void coroutine_fn add_cow_open_entry(void *opaque)
{
    AddCowOpenCo *oc = opaque;
    BDRVAddCowState *s = oc->bs->opaque;

    bdrv_graph_co_rdlock();
    qemu_co_mutex_lock(&s->lock);
    oc->ret = add_cow_do_open(oc->bs, oc->options, oc->flags, true, oc->errp);
    qemu_co_mutex_unlock(&s->lock);
    bdrv_graph_co_rdunlock();
    if (oc->ret < 0) {
        add_cow_unref_image(oc->bs);
        add_cow_free_state(s);
    }
    aio_wait_kick();
}

static int add_cow_open(BlockDriverState *bs, QDict *options, int flags,
                        Error **errp)
{
    BDRVAddCowState *s = bs->opaque;
    AddCowOpenCo oc = {
        .bs = bs,
        .options = options,
        .flags = flags,
        .errp = errp,
        .ret = -EINPROGRESS,
    };
    int ret;

    ret = bdrv_open_file_child(NULL, options, "file", bs, errp);
    if (ret < 0) {
        return ret;
    }
    s->bs = bs;
    qemu_co_mutex_init(&s->lock);

    assert(!qemu_in_coroutine());
    assert(qemu_get_current_aio_context() == qemu_get_aio_context());
    aio_co_enter(bdrv_get_aio_context(bs),
                 qemu_coroutine_create(add_cow_open_entry, &oc));
    AIO_WAIT_WHILE_UNLOCKED(NULL, oc.ret == -EINPROGRESS);
    return oc.ret;
}

static int GRAPH_RDLOCK add_cow_flush_cache_sync(BlockDriverState *bs);

static void GRAPH_RDLOCK add_cow_do_close(BlockDriverState *bs,
                                          bool close_image)
{
    BDRVAddCowState *s = bs->opaque;

    /*
     * bdrv_close() flushed already; this only retries entries a failed
     * flush left dirty.  Their data is safe either way: a lost bit only
     * means the cluster reads from the backing file, as before the write.
     */
    if (!(bs->open_flags & BDRV_O_INACTIVE) && s->cache &&
        add_cow_cache_is_dirty(s->cache)) {
        add_cow_flush_cache_sync(bs);
    }
    add_cow_free_state(s);

    if (close_image && s->image) {
        bdrv_graph_rdunlock_main_loop();
        bdrv_graph_wrlock_drained();
        bdrv_unref_child(bs, s->image);
        bdrv_graph_wrunlock();
        s->image = NULL;
        bdrv_graph_rdlock_main_loop();
    }
}

static void GRAPH_UNLOCKED add_cow_close(BlockDriverState *bs)
{
    GLOBAL_STATE_CODE();
    GRAPH_RDLOCK_GUARD_MAINLOOP();

    add_cow_do_close(bs, true);
}

static int GRAPH_UNLOCKED
add_cow_reopen_prepare(BDRVReopenState *state, BlockReopenQueue *queue,
                       Error **errp)
{
    int ret;

    GLOBAL_STATE_CODE();
    GRAPH_RDLOCK_GUARD_MAINLOOP();

    /* Dirty bitmap entries could not be written once read-only */
    if (!(state->flags & BDRV_O_RDWR)) {
        ret = bdrv_flush(state->bs);
        if (ret < 0) {
            error_setg_errno(errp, -ret, "Could not write the add-cow "
                             "bitmap before reopening read-only");
            return ret;
        }
    }
    return 0;
}

/*
 * Like bdrv_default_perms(), except that the image file (the data child)
 * is writable whenever the node is, as the .add-cow file is: add-cow
 * writes the image file on its own account even for parents that never
 * write, e.g. copy-on-read fills (-drive copy-on-read=on below a read-only
 * user) and the zeros that growing writes (block_resize).  Which parents
 * may share writes to the image file is left as bdrv_default_perms() says.
 */
static void add_cow_child_perm(BlockDriverState *bs, BdrvChild *c,
                               BdrvChildRole role,
                               BlockReopenQueue *reopen_queue,
                               uint64_t perm, uint64_t shared,
                               uint64_t *nperm, uint64_t *nshared)
{
    bdrv_default_perms(bs, c, role, reopen_queue, perm, shared, nperm,
                       nshared);
    if (c != bs->file && (role & BDRV_CHILD_DATA)) {
        uint64_t mperm, mshared;

        /* Metadata children get WRITE exactly when the node is writable */
        bdrv_default_perms(bs, c, BDRV_CHILD_METADATA, reopen_queue, 0,
                           BLK_PERM_ALL, &mperm, &mshared);
        *nperm |= mperm & (BLK_PERM_WRITE | BLK_PERM_RESIZE);
    }
}

static void add_cow_refresh_limits(BlockDriverState *bs, Error **errp)
{
    BDRVAddCowState *s = bs->opaque;

    bs->bl.pwrite_zeroes_alignment = s->cluster_size;
    bs->bl.pdiscard_alignment = s->cluster_size;
}

/*
 * Requests in flight that serialize against each other (allocating writes,
 * discards and resize), by byte range.  An interval tree rather than a
 * reqlist: a guest queue may keep thousands of allocations in flight, and
 * a list walk per request made that quadratic.  Called with s->lock held.
 */
typedef struct AddCowReq {
    IntervalTreeNode node;      /* [start, last] in bytes */
    CoQueue wait_queue;         /* requests waiting for this one */
} AddCowReq;

static void add_cow_req_add(BDRVAddCowState *s, AddCowReq *req,
                            int64_t offset, int64_t bytes)
{
    req->node.start = offset;
    req->node.last = offset + bytes - 1;
    qemu_co_queue_init(&req->wait_queue);
    interval_tree_insert(&req->node, &s->inflight);
}

static void add_cow_req_remove(BDRVAddCowState *s, AddCowReq *req)
{
    interval_tree_remove(&req->node, &s->inflight);
    qemu_co_queue_restart_all(&req->wait_queue);
}

/* Wait for one request overlapping [@offset, @offset + @bytes), if any */
static bool coroutine_fn add_cow_wait_one(BDRVAddCowState *s, int64_t offset,
                                          int64_t bytes)
{
    IntervalTreeNode *node;

    if (bytes <= 0) {
        return false;
    }
    node = interval_tree_iter_first(&s->inflight, offset, offset + bytes - 1);
    if (!node) {
        return false;
    }
    qemu_co_queue_wait(&container_of(node, AddCowReq, node)->wait_queue,
                       &s->lock);
    return true;
}

static void coroutine_fn add_cow_wait_all(BDRVAddCowState *s, int64_t offset,
                                          int64_t bytes)
{
    while (add_cow_wait_one(s, offset, bytes)) {
        /* The tree may have changed while waiting: look again */
    }
}

/* Read @bytes at @offset from the backing file, or zeros without one */
static int coroutine_fn GRAPH_RDLOCK
add_cow_read_backing(BlockDriverState *bs, int64_t offset, int64_t bytes,
                     QEMUIOVector *qiov, size_t qiov_offset)
{
    if (bs->backing) {
        BLKDBG_CO_EVENT(bs->file, BLKDBG_READ_BACKING_AIO);
        /* The block layer zero-fills reads past the backing file's end */
        return bdrv_co_preadv_part(bs->backing, offset, bytes, qiov,
                                   qiov_offset, 0);
    }
    qemu_iovec_memset(qiov, qiov_offset, 0, bytes);
    return 0;
}

/*
 * Find the run of clusters sharing the allocation state of the cluster at
 * @offset, limited to @bytes.  Returns the run's length in bytes.
 * Caller holds s->lock.
 */
static int64_t coroutine_fn GRAPH_RDLOCK
add_cow_find_run(BDRVAddCowState *s, int64_t offset, int64_t bytes,
                 bool *allocated)
{
    uint64_t first = offset >> s->header.cluster_bits;
    uint64_t last = (offset + bytes - 1) >> s->header.cluster_bits;
    int64_t n, end;

    if (add_cow_all_allocated(s)) {
        *allocated = true;
        return bytes;
    }
    n = add_cow_cache_get_run(s->cache, first, last - first + 1, allocated);
    if (n < 0) {
        return n;
    }
    end = (first + n) << s->header.cluster_bits;
    return MIN(end - offset, bytes);
}

static int coroutine_fn GRAPH_RDLOCK
add_cow_co_preadv_part(BlockDriverState *bs, int64_t offset, int64_t bytes,
                       QEMUIOVector *qiov, size_t qiov_offset,
                       BdrvRequestFlags flags)
{
    BDRVAddCowState *s = bs->opaque;
    bool allocated;
    int64_t n;
    int ret;

    while (bytes > 0) {
        qemu_co_mutex_lock(&s->lock);
        n = add_cow_find_run(s, offset, bytes, &allocated);
        qemu_co_mutex_unlock(&s->lock);
        if (n < 0) {
            return n;
        }

        if (allocated) {
            BLKDBG_CO_EVENT(bs->file, BLKDBG_READ_AIO);
            ret = bdrv_co_preadv_part(s->image, offset, n, qiov, qiov_offset,
                                      0);
        } else {
            ret = add_cow_read_backing(bs, offset, n, qiov, qiov_offset);
        }
        if (ret < 0) {
            return ret;
        }
        offset += n;
        bytes -= n;
        qiov_offset += n;
    }
    return 0;
}

/*
 * Read the current content of [@offset, @offset + @bytes) of an unallocated
 * area (a copy-on-write source) into a new buffer *@buf, which the caller
 * frees.  Nothing to read leaves *@buf NULL.
 */
static int coroutine_fn GRAPH_RDLOCK
add_cow_read_cow(BlockDriverState *bs, int64_t offset, int64_t bytes,
                 void **buf)
{
    BDRVAddCowState *s = bs->opaque;
    QEMUIOVector qiov;

    *buf = NULL;
    if (!bytes) {
        return 0;
    }
    *buf = qemu_try_blockalign(s->image->bs, bytes);
    if (!*buf) {
        return -ENOMEM;
    }
    BLKDBG_CO_EVENT(bs->file, BLKDBG_COW_READ);
    qemu_iovec_init_buf(&qiov, *buf, bytes);
    return add_cow_read_backing(bs, offset, bytes, &qiov, 0);
}

/*
 * Largest guest write between two copy-on-write areas for which the areas
 * are read from the backing file in one request
 */
#define ADD_COW_COW_MERGE_GAP   (64 * 1024)

/*
 * Write @local (head fill, guest data, tail fill from @cow_start) to the
 * image file.  The guest request alone may use up to IOV_MAX entries: then
 * the fill areas and the guest data go separately (as qcow2 does when it
 * cannot merge them).  All of it precedes the bits anyway.
 */
static int coroutine_fn GRAPH_RDLOCK
add_cow_write_filled(BDRVAddCowState *s, int64_t cow_start,
                     QEMUIOVector *local, int64_t offset, int64_t bytes,
                     QEMUIOVector *qiov, size_t qiov_offset,
                     void *head_buf, void *tail_buf)
{
    int64_t head = offset - cow_start;
    int64_t tail = local->size - head - bytes;
    int ret;

    if (local->niov <= IOV_MAX) {
        return bdrv_co_pwritev(s->image, cow_start, local->size, local, 0);
    }
    ret = bdrv_co_pwritev_part(s->image, offset, bytes, qiov, qiov_offset, 0);
    if (ret == 0 && head) {
        ret = bdrv_co_pwrite(s->image, cow_start, head, head_buf, 0);
    }
    if (ret == 0 && tail) {
        ret = bdrv_co_pwrite(s->image, offset + bytes, tail, tail_buf, 0);
    }
    return ret;
}

/*
 * Write guest data into unallocated clusters: [@offset, @offset + @bytes)
 * lies within the clusters starting at @cow_start and ending at @cow_end
 * (cluster-aligned, clamped to the virtual size).  The rest of those
 * clusters is filled from the backing file, in the same write request.
 */
static int coroutine_fn GRAPH_RDLOCK
add_cow_write_alloc(BlockDriverState *bs, int64_t cow_start, int64_t cow_end,
                    int64_t offset, int64_t bytes, QEMUIOVector *qiov,
                    size_t qiov_offset)
{
    BDRVAddCowState *s = bs->opaque;
    int64_t head = offset - cow_start;
    int64_t tail = cow_end - (offset + bytes);
    void *head_buf = NULL, *tail_buf = NULL;
    QEMUIOVector local;
    int ret;

    trace_add_cow_alloc_write(bs, offset, bytes, cow_start, cow_end);
    if (!head && !tail) {
        BLKDBG_CO_EVENT(bs->file, BLKDBG_WRITE_AIO);
        return bdrv_co_pwritev_part(s->image, offset, bytes, qiov,
                                    qiov_offset, 0);
    }

    if (head && tail && bytes <= ADD_COW_COW_MERGE_GAP) {
        /*
         * Both ends need copy-on-write and the guest data between them is
         * small: one backing read of the whole range costs less than two
         * requests (qcow2 does the same).  The middle of the buffer, which
         * the guest data replaces, is read and dropped.
         */
        ret = add_cow_read_cow(bs, cow_start, cow_end - cow_start, &head_buf);
    } else {
        ret = add_cow_read_cow(bs, cow_start, head, &head_buf);
        if (ret == 0) {
            ret = add_cow_read_cow(bs, offset + bytes, tail, &tail_buf);
        }
    }
    if (ret == 0) {
        void *tail_src = tail_buf ?: !tail ? NULL :
                         (uint8_t *)head_buf + head + bytes;

        qemu_iovec_init(&local, qiov->niov + 2);
        if (head) {
            qemu_iovec_add(&local, head_buf, head);
        }
        qemu_iovec_concat(&local, qiov, qiov_offset, bytes);
        if (tail) {
            qemu_iovec_add(&local, tail_src, tail);
        }
        BLKDBG_CO_EVENT(bs->file, BLKDBG_COW_WRITE);
        ret = add_cow_write_filled(s, cow_start, &local, offset, bytes, qiov,
                                   qiov_offset, head_buf, tail_src);
        qemu_iovec_destroy(&local);
    }
    qemu_vfree(head_buf);
    qemu_vfree(tail_buf);
    return ret;
}

/* Mark [@offset, @end) allocated; data must already be in the image file */
static int coroutine_fn GRAPH_RDLOCK
add_cow_mark_allocated(BDRVAddCowState *s, int64_t offset, int64_t end)
{
    uint64_t first = offset >> s->header.cluster_bits;
    uint64_t last = (end - 1) >> s->header.cluster_bits;

    return add_cow_cache_set(s->cache, first, last - first + 1, true);
}

/*
 * Write a run of @n bytes at @offset whose clusters are all allocated or
 * all unallocated (@allocated); @qiov NULL writes zeros.  Called without
 * s->lock; an unallocated run must be registered in s->inflight.
 */
static int coroutine_fn GRAPH_RDLOCK
add_cow_write_run(BlockDriverState *bs, int64_t offset, int64_t n,
                  bool allocated, QEMUIOVector *qiov, size_t qiov_offset,
                  BdrvRequestFlags flags)
{
    BDRVAddCowState *s = bs->opaque;
    int64_t cow_start = QEMU_ALIGN_DOWN(offset, s->cluster_size);
    int64_t cow_end = MIN(ROUND_UP(offset + n, s->cluster_size),
                          (int64_t)s->header.virtual_size);
    int ret;

    if (allocated && qiov) {
        BLKDBG_CO_EVENT(bs->file, BLKDBG_WRITE_AIO);
        return bdrv_co_pwritev_part(s->image, offset, n, qiov, qiov_offset,
                                    0);
    }
    if (!qiov) {
        /*
         * add_cow_co_pwrite_zeroes() only passes whole clusters, so there
         * is nothing to copy from the backing file
         */
        ret = bdrv_co_pwrite_zeroes(s->image, offset, n, flags);
    } else {
        ret = add_cow_write_alloc(bs, cow_start, cow_end, offset, n, qiov,
                                  qiov_offset);
    }
    if (ret == 0 && !allocated) {
        /* The data is written: now the bits may be set */
        qemu_co_mutex_lock(&s->lock);
        ret = add_cow_mark_allocated(s, cow_start, cow_end);
        qemu_co_mutex_unlock(&s->lock);
    }
    return ret;
}

/*
 * Write path shared by guest writes and zero writes (@qiov == NULL).
 * Allocated clusters are written in place; runs of unallocated clusters go
 * through add_cow_write_alloc() and have their bits set once the data write
 * completed.
 */
static int coroutine_fn GRAPH_RDLOCK
add_cow_do_write(BlockDriverState *bs, int64_t offset, int64_t bytes,
                 QEMUIOVector *qiov, size_t qiov_offset,
                 BdrvRequestFlags flags)
{
    BDRVAddCowState *s = bs->opaque;
    int64_t start = QEMU_ALIGN_DOWN(offset, s->cluster_size);
    int64_t end = MIN(ROUND_UP(offset + bytes, s->cluster_size),
                      (int64_t)s->header.virtual_size);
    bool allocated = false;
    AddCowReq req;
    int64_t n = 0;
    int ret;

    qemu_co_mutex_lock(&s->lock);
    ret = add_cow_clear_unknown_autoclear(bs);
    while (ret == 0) {
        n = add_cow_find_run(s, offset, bytes, &allocated);
        if (n < 0 || (allocated && n == bytes)) {
            break;
        }
        /* Serialize against other allocations of the same clusters */
        if (!add_cow_wait_one(s, start, end - start)) {
            break;
        }
    }
    if (ret < 0 || n < 0) {
        qemu_co_mutex_unlock(&s->lock);
        return ret < 0 ? ret : n;
    }
    if (allocated && n == bytes) {
        /* Fast path: everything is in the image file already */
        qemu_co_mutex_unlock(&s->lock);
        return add_cow_write_run(bs, offset, bytes, true, qiov, qiov_offset,
                                 flags);
    }

    add_cow_req_add(s, &req, start, end - start);
    while (bytes > 0) {
        n = add_cow_find_run(s, offset, bytes, &allocated);
        if (n < 0) {
            ret = n;
            break;
        }
        qemu_co_mutex_unlock(&s->lock);
        ret = add_cow_write_run(bs, offset, n, allocated, qiov, qiov_offset,
                                flags);
        qemu_co_mutex_lock(&s->lock);
        if (ret < 0) {
            break;
        }
        offset += n;
        bytes -= n;
        qiov_offset += n;
    }
    add_cow_req_remove(s, &req);
    qemu_co_mutex_unlock(&s->lock);
    return ret;
}

static int coroutine_fn GRAPH_RDLOCK
add_cow_co_pwritev_part(BlockDriverState *bs, int64_t offset, int64_t bytes,
                        QEMUIOVector *qiov, size_t qiov_offset,
                        BdrvRequestFlags flags)
{
    return add_cow_do_write(bs, offset, bytes, qiov, qiov_offset, 0);
}

static int coroutine_fn GRAPH_RDLOCK
add_cow_co_pwrite_zeroes(BlockDriverState *bs, int64_t offset, int64_t bytes,
                         BdrvRequestFlags flags)
{
    BDRVAddCowState *s = bs->opaque;
    int64_t end = offset + bytes;

    /*
     * Whole clusters only (the last one may end at the virtual size);
     * the block layer writes a zeroed buffer for the rest.
     */
    if (!QEMU_IS_ALIGNED(offset, s->cluster_size) ||
        (!QEMU_IS_ALIGNED(end, s->cluster_size) &&
         end != s->header.virtual_size)) {
        return -ENOTSUP;
    }
    /*
     * Unallocated clusters are allocated even when they read zeros today:
     * a backing file named later (qemu-img rebase writes zeros exactly so
     * that they stay zeros under the new backing file) would show through.
     */
    return add_cow_do_write(bs, offset, bytes, NULL, 0,
                            flags & (BDRV_REQ_MAY_UNMAP |
                                     BDRV_REQ_NO_FALLBACK));
}

/*
 * Discard whole clusters.
 *
 * With a backing file (named in the header or attached at runtime) or the
 * all-allocated flag, the clusters become zero writes (unmapped in the
 * image file where it can): clearing their bits would make older backing
 * data reappear, and the flag needs a full bitmap.  They read zeros
 * afterwards, as qcow2's zero clusters do.
 *
 * Without a backing file the clusters become unallocated, following the
 * spec's order: bits cleared and the bitmap flushed before the image file
 * data is discarded.  The range stays registered in s->inflight until the
 * discard is done, so that an allocating write to the same clusters waits
 * and its data cannot fall into the hole.
 */
static int coroutine_fn GRAPH_RDLOCK
add_cow_co_pdiscard(BlockDriverState *bs, int64_t offset, int64_t bytes)
{
    BDRVAddCowState *s = bs->opaque;
    int64_t end = offset + bytes;
    uint64_t first, count;
    AddCowReq req;
    int ret;

    if (!QEMU_IS_ALIGNED(offset, s->cluster_size) ||
        (!QEMU_IS_ALIGNED(end, s->cluster_size) &&
         end != s->header.virtual_size)) {
        return -ENOTSUP;
    }
    if (add_cow_has_backing(bs) || add_cow_all_allocated(s)) {
        return add_cow_do_write(bs, offset, bytes, NULL, 0,
                                BDRV_REQ_MAY_UNMAP);
    }

    first = offset >> s->header.cluster_bits;
    count = DIV_ROUND_UP(bytes, s->cluster_size);
    qemu_co_mutex_lock(&s->lock);
    add_cow_wait_all(s, offset, bytes);
    add_cow_req_add(s, &req, offset, bytes);
    ret = add_cow_clear_unknown_autoclear(bs);
    if (ret == 0) {
        ret = add_cow_cache_set(s->cache, first, count, false);
    }
    if (ret == 0) {
        ret = add_cow_cache_write(s->cache);
    }
    if (ret == 0) {
        ret = bdrv_co_flush(bs->file->bs);
    }
    qemu_co_mutex_unlock(&s->lock);
    if (ret == 0) {
        ret = bdrv_co_pdiscard(s->image, offset, bytes);
    }
    qemu_co_mutex_lock(&s->lock);
    add_cow_req_remove(s, &req);
    qemu_co_mutex_unlock(&s->lock);
    return ret;
}

static int coroutine_fn GRAPH_RDLOCK add_cow_co_flush_to_os(
    BlockDriverState *bs)
{
    BDRVAddCowState *s = bs->opaque;
    int ret;

    /*
     * Image flush (without s->lock: a guest flush must not stall the reads
     * and writes that do not depend on it), then the dirty bitmap entries.
     * The block layer then flushes both children, which makes the bitmap
     * itself stable.
     */
    qemu_co_mutex_lock(&s->lock);
    ret = add_cow_cache_flush_image(s->cache, &s->lock);
    if (ret == 0) {
        ret = add_cow_cache_write(s->cache);
    }
    qemu_co_mutex_unlock(&s->lock);
    return ret;
}

static int GRAPH_RDLOCK add_cow_flush_cache_sync(BlockDriverState *bs)
{
    /* bdrv_flush() runs the whole flush path, including flush_to_os */
    return bdrv_flush(bs);
}

static int coroutine_fn GRAPH_RDLOCK
add_cow_co_block_status(BlockDriverState *bs, unsigned int mode,
                        int64_t offset, int64_t bytes, int64_t *pnum,
                        int64_t *map, BlockDriverState **file)
{
    BDRVAddCowState *s = bs->opaque;
    bool allocated;
    int64_t n;

    qemu_co_mutex_lock(&s->lock);
    n = add_cow_find_run(s, offset, bytes, &allocated);
    qemu_co_mutex_unlock(&s->lock);
    if (n < 0) {
        return n;
    }
    *pnum = n;
    if (!allocated) {
        return 0;
    }
    if (!s->image) {
        return BDRV_BLOCK_DATA;
    }
    *map = offset;
    *file = s->image->bs;
    return BDRV_BLOCK_DATA | BDRV_BLOCK_OFFSET_VALID;
}

static int64_t coroutine_fn add_cow_co_getlength(BlockDriverState *bs)
{
    BDRVAddCowState *s = bs->opaque;

    return s->header.virtual_size;
}

static int coroutine_fn
add_cow_co_get_info(BlockDriverState *bs, BlockDriverInfo *bdi)
{
    BDRVAddCowState *s = bs->opaque;

    memset(bdi, 0, sizeof(*bdi));
    bdi->cluster_size = s->cluster_size;
    return 0;
}

static char * GRAPH_RDLOCK add_cow_image_path(BlockDriverState *bs)
{
    BDRVAddCowState *s = bs->opaque;

    if (s->image) {
        return g_strdup(s->image->bs->filename);
    }
    return add_cow_header_image_path(bs);
}

/*
 * Is the image file node the one the header names, i.e. would opening the
 * .add-cow file by its name alone open the same tree?  A node given with
 * image-file counts if it is the plain file the header names.
 */
static bool GRAPH_RDLOCK add_cow_image_is_default(BlockDriverState *bs)
{
    BDRVAddCowState *s = bs->opaque;
    BlockDriverState *img = s->image ? s->image->bs : NULL;
    g_autofree char *path = NULL;
    struct stat a, b;

    if (!s->image_overridden) {
        return true;
    }
    if (!img || !img->drv || strcmp(img->drv->format_name, "file") ||
        !s->image_name) {
        return false;
    }
    path = add_cow_header_image_path(bs);
    return path && stat(path, &a) == 0 && stat(img->filename, &b) == 0 &&
           a.st_dev == b.st_dev && a.st_ino == b.st_ino;
}

/*
 * Bytes the image file takes on disk when it is not open, or -errno:
 * stat() only, which neither opens nor blocks on what the header names
 */
static int64_t GRAPH_RDLOCK add_cow_stat_image(BlockDriverState *bs)
{
    g_autofree char *path = NULL;
    struct stat st;

    if (!add_cow_local_file(bs->file->bs)) {
        return -ENOTSUP;
    }
    path = add_cow_image_path(bs);
    if (!path || stat(path, &st) < 0) {
        return -errno;
    }
    return S_ISREG(st.st_mode) ? (int64_t)st.st_blocks * 512 : -ENOTSUP;
}

/* The disk takes the .add-cow file and the image file */
static int64_t coroutine_fn GRAPH_RDLOCK
add_cow_co_get_allocated_file_size(BlockDriverState *bs)
{
    BDRVAddCowState *s = bs->opaque;
    int64_t meta = bdrv_co_get_allocated_file_size(bs->file->bs);
    int64_t image = s->image ?
                    bdrv_co_get_allocated_file_size(s->image->bs) :
                    add_cow_stat_image(bs);

    if (meta < 0 || image < 0) {
        return meta;
    }
    return meta + image;
}

static ImageInfoSpecific * GRAPH_RDLOCK
add_cow_get_specific_info(BlockDriverState *bs, Error **errp)
{
    BDRVAddCowState *s = bs->opaque;
    ImageInfoSpecific *spec = g_new0(ImageInfoSpecific, 1);
    ImageInfoSpecificAddCow *info = g_new0(ImageInfoSpecificAddCow, 1);
    int64_t disk_size = s->image ?
                        bdrv_get_allocated_file_size(s->image->bs) :
                        add_cow_stat_image(bs);
    /* Kept up to date by the cache: no bitmap I/O, no lock needed */
    uint64_t allocated = add_cow_all_allocated(s) ? s->nb_clusters :
                         add_cow_cache_count(s->cache);

    *info = (ImageInfoSpecificAddCow) {
        .image_file = g_strdup(s->image_name),
        .image_file_path = add_cow_image_path(bs),
        .has_image_file_disk_size = disk_size >= 0,
        .image_file_disk_size = MAX(disk_size, 0),
        .image_format = g_strdup(s->header.image_format),
        .backing_format = s->header.backing_format[0] ?
                          g_strdup(s->header.backing_format) : NULL,
        .cluster_size = s->cluster_size,
        .has_allocated_clusters = true,
        .allocated_clusters = allocated,
        .total_clusters = s->nb_clusters,
        .all_allocated = add_cow_all_allocated(s),
    };
    spec->type = IMAGE_INFO_SPECIFIC_KIND_ADD_COW;
    spec->u.add_cow.data = info;
    return spec;
}

/*
 * For image_file_raw=on, on an image without backing file: unallocated
 * clusters read zeros, so write zeros there in the image file (a hole where
 * the image file supports it) and mark those clusters allocated.  Order:
 * zeros written, image file flushed (the cache does that before it writes
 * a set bit), bits written, .add-cow file flushed; only then may the caller
 * write sector 0 with the all-allocated flag.
 * Caller holds s->lock.
 */
int coroutine_fn GRAPH_RDLOCK
add_cow_fill_unallocated(BlockDriverState *bs)
{
    BDRVAddCowState *s = bs->opaque;
    int64_t offset, n;
    bool allocated;
    int pass, ret;

    if (add_cow_all_allocated(s)) {
        return 0;
    }
    /* Allocating writes in flight would race with the zeros */
    add_cow_wait_all(s, 0, s->header.virtual_size);

    /*
     * Pass 0 writes the zeros of every unallocated run, pass 1 sets the
     * bits.  Zeros in unallocated clusters are invisible, so a failed zero
     * write changes nothing the guest sees; setting each run's bits right
     * after its zeros would leave the runs before the failure reading zeros
     * and the others reading the backing file.
     */
    for (pass = 0; pass < 2; pass++) {
        for (offset = 0; offset < s->header.virtual_size; offset += n) {
            n = add_cow_find_run(s, offset, s->header.virtual_size - offset,
                                 &allocated);
            if (n < 0) {
                return n;
            }
            if (allocated) {
                continue;
            }
            if (pass == 0) {
                ret = bdrv_co_pwrite_zeroes(s->image, offset, n,
                                            BDRV_REQ_MAY_UNMAP);
            } else {
                ret = add_cow_mark_allocated(s, offset, offset + n);
            }
            if (ret < 0) {
                return ret;
            }
        }
    }
    ret = add_cow_cache_write(s->cache);
    if (ret < 0) {
        return ret;
    }
    return bdrv_co_flush(bs->file->bs);
}

/*
 * Change the backing file name and format (qemu-img rebase, block-stream,
 * block-commit, QMP change-backing-file).  This is a metadata update only,
 * as the block layer assumes (it may still have the old backing node
 * attached, as in stream_prepare()): no bit and no guest data changes.
 * Without a backing file, unallocated clusters read as zeros, as in qcow2;
 * making the image file a standalone raw disk is the separate "qemu-img
 * amend -o image_file_raw=on".
 *
 * Every allocation made so far (e.g. the clusters a safe rebase just
 * copied) is made stable, bits included, before the header names another
 * backing file; otherwise a crash would let those clusters read the new
 * backing file's data.  add_cow_switch_name() then switches the name.
 */
static int coroutine_fn GRAPH_RDLOCK
add_cow_co_change_backing_file(BlockDriverState *bs, const char *backing_file,
                               const char *backing_fmt)
{
    BDRVAddCowState *s = bs->opaque;
    AddCowHeader h;
    int ret;

    if (backing_file && !backing_file[0]) {
        backing_file = NULL;
    }
    if (backing_file && strlen(backing_file) > ADD_COW_MAX_NAME_SIZE) {
        error_report("Backing file name '%s' is too long for add-cow "
                     "(at most %d bytes)", backing_file,
                     ADD_COW_MAX_NAME_SIZE);
        return -EINVAL;
    }
    if (backing_file && (!backing_fmt || !backing_fmt[0] ||
                         strlen(backing_fmt) >= ADD_COW_FMT_SIZE)) {
        error_report("add-cow needs a backing format of 1 to %d characters",
                     ADD_COW_FMT_SIZE - 1);
        return -EINVAL;
    }
    if (backing_file && add_cow_names_itself(bs, backing_file)) {
        error_report("'%s' cannot be the backing file of itself",
                     backing_file);
        return -EINVAL;
    }

    qemu_co_mutex_lock(&s->lock);
    ret = add_cow_clear_unknown_autoclear(bs);
    if (ret == 0) {
        ret = add_cow_cache_write(s->cache);
    }
    if (ret == 0) {
        ret = bdrv_co_flush(bs->file->bs);
    }
    h = s->header;
    memset(h.backing_format, 0, sizeof(h.backing_format));
    if (backing_file) {
        pstrcpy(h.backing_format, sizeof(h.backing_format), backing_fmt);
    }
    if (ret == 0) {
        ret = add_cow_switch_name(bs, &h, true, backing_file);
    }
    qemu_co_mutex_unlock(&s->lock);
    return ret;
}

/*
 * Make [@old_size, @new_size) read zeros in a growing image: the part of
 * an unallocated boundary cluster gets a copy-on-write allocation with a
 * zero tail, whole new clusters are zeroed in the image file and marked
 * allocated.  The cache flushes the image file before it writes the bits,
 * which are padding on disk until the header grows.
 * Called with s->lock held and the bitmap already resized.
 */
static int coroutine_fn GRAPH_RDLOCK
add_cow_zero_new_area(BlockDriverState *bs, int64_t old_size,
                      int64_t new_size)
{
    BDRVAddCowState *s = bs->opaque;
    int64_t zstart = ROUND_UP(old_size, s->cluster_size);
    uint64_t first, last;
    bool allocated;
    int64_t n;
    int ret;

    if (zstart > old_size) {
        int64_t cow_start = QEMU_ALIGN_DOWN(old_size, s->cluster_size);
        int64_t cow_end = MIN(zstart, new_size);

        n = add_cow_find_run(s, cow_start, 1, &allocated);
        if (n < 0) {
            return n;
        }
        if (!allocated) {
            uint8_t *buf = qemu_try_blockalign0(s->image->bs,
                                                cow_end - cow_start);
            QEMUIOVector qiov;

            if (!buf) {
                return -ENOMEM;
            }
            /* Old content up to the old end, zeros after it */
            BLKDBG_CO_EVENT(bs->file, BLKDBG_COW_READ);
            qemu_iovec_init_buf(&qiov, buf, old_size - cow_start);
            ret = add_cow_read_backing(bs, cow_start, old_size - cow_start,
                                       &qiov, 0);
            if (ret == 0) {
                ret = bdrv_co_pwrite(s->image, cow_start, cow_end - cow_start,
                                     buf, 0);
            }
            qemu_vfree(buf);
            if (ret == 0) {
                ret = add_cow_cache_set(s->cache, cow_start >>
                                        s->header.cluster_bits, 1, true);
            }
            if (ret < 0) {
                return ret;
            }
        }
    }
    if (zstart < new_size) {
        ret = bdrv_co_pwrite_zeroes(s->image, zstart, new_size - zstart,
                                    BDRV_REQ_MAY_UNMAP);
        if (ret < 0) {
            return ret;
        }
        first = zstart >> s->header.cluster_bits;
        last = (new_size - 1) >> s->header.cluster_bits;
        ret = add_cow_cache_set(s->cache, first, last - first + 1, true);
        if (ret < 0) {
            return ret;
        }
    }
    return add_cow_cache_write(s->cache);
}

/*
 * Growing to @offset: the image file bytes between the old end and the end
 * of an allocated partial last cluster become visible, so zero them.
 */
static int coroutine_fn GRAPH_RDLOCK
add_cow_zero_old_tail(BlockDriverState *bs, uint64_t offset,
                      int64_t image_len)
{
    BDRVAddCowState *s = bs->opaque;
    uint64_t old_size = s->header.virtual_size;
    int64_t zend = MIN(MIN(ROUND_UP(old_size, s->cluster_size), offset),
                       image_len);
    bool allocated;
    int64_t n;

    if (QEMU_IS_ALIGNED(old_size, s->cluster_size) || zend <= old_size) {
        return 0;
    }
    n = add_cow_find_run(s, old_size - 1, 1, &allocated);
    if (n < 0) {
        return n;
    }
    return allocated ? bdrv_co_pwrite_zeroes(s->image, old_size,
                                             zend - old_size, 0) : 0;
}

/*
 * Grow, in the spec's order ("Resize"): (1) if the old last cluster is
 * partial and allocated, zero the image file bytes between the old end and
 * the end of that cluster (they become visible); (2) extend the image file
 * if it is shorter than the new size; (3) clear on disk every bit between
 * the old and the new number of clusters, which may be stale from an
 * earlier shrink, and with BDRV_REQ_ZERO_WRITE zero the new area and set
 * its bits; (4) flush both files; (5) write the header with the new size,
 * clearing the all-allocated flag if clusters were added.  A crash or a
 * failure before (5) leaves the old size and nothing visible changed; the
 * cache goes back to the old geometry.
 */
static int coroutine_fn GRAPH_RDLOCK
add_cow_grow(BlockDriverState *bs, uint64_t offset, int64_t image_len,
             PreallocMode prealloc, BdrvRequestFlags flags, Error **errp)
{
    BDRVAddCowState *s = bs->opaque;
    uint64_t old_size = s->header.virtual_size;
    uint64_t nb_clusters = DIV_ROUND_UP(offset, s->cluster_size);
    AddCowHeader h = s->header;
    int ret;

    /* (1) */
    ret = add_cow_zero_old_tail(bs, offset, image_len);
    if (ret < 0) {
        error_setg_errno(errp, -ret, "Could not clear the image file past "
                         "the old end");
        return ret;
    }
    /* (2) */
    if (image_len < offset) {
        ret = bdrv_co_truncate(s->image, offset, false, prealloc, 0, errp);
        if (ret < 0) {
            return ret;
        }
    }
    /* (3) the cache writes the boundary entry and zeroes the rest */
    ret = add_cow_cache_resize(s->cache, nb_clusters);
    if (ret < 0) {
        error_setg_errno(errp, -ret, "Could not extend the bitmap");
        return ret;
    }
    /*
     * (3b) The backing file reaches into the new area (the block layer
     * asks for BDRV_REQ_ZERO_WRITE): the new area must read zeros as soon
     * as the new size is visible, so zero it and set its bits now.
     */
    if (flags & BDRV_REQ_ZERO_WRITE) {
        ret = add_cow_zero_new_area(bs, old_size, offset);
        if (ret < 0) {
            error_setg_errno(errp, -ret, "Could not zero the new area");
            goto fail;
        }
    }
    /* (4) */
    ret = bdrv_co_flush(s->image->bs);
    if (ret == 0) {
        ret = bdrv_co_flush(bs->file->bs);
    }
    if (ret < 0) {
        error_setg_errno(errp, -ret, "Could not flush before the header "
                         "update");
        goto fail;
    }
    /* (5) */
    h.virtual_size = offset;
    h.bitmap_size = add_cow_bitmap_size(nb_clusters);
    if (nb_clusters > s->nb_clusters) {
        h.autoclear_features &= ~ADD_COW_AUTOCLEAR_ALL_ALLOCATED;
    }
    ret = add_cow_update_header(bs, &h);
    if (ret < 0) {
        error_setg_errno(errp, -ret, "Could not write the add-cow header");
        goto fail;
    }
    add_cow_set_geometry(s);
    return 0;

fail:
    /* Bits set past the old end are padding on disk; check -r leaks them */
    add_cow_cache_truncate(s->cache, s->nb_clusters);
    return ret;
}

/*
 * Shrink: (1) write back the cache, so the steps below cannot fail for a
 * reason of its own; (2) write and flush the header with the new size, so
 * clusters past the new end disappear at once; (3) clear their bits on
 * disk (now padding or past the bitmap), so that a later grow can never
 * show them again; (4) truncate the image file.  The shrink is done once
 * (2) succeeded: the block layer then takes the new length, so a failure
 * of (3) or (4) is only reported.  Bits that stay set are padding, which
 * readers ignore and grow clears; data past the end of the image file is
 * not part of the disk.
 */
static int coroutine_fn GRAPH_RDLOCK
add_cow_shrink(BlockDriverState *bs, uint64_t offset, int64_t image_len,
               Error **errp)
{
    BDRVAddCowState *s = bs->opaque;
    uint64_t old_bitmap_size = s->header.bitmap_size;
    uint64_t nb_clusters = DIV_ROUND_UP(offset, s->cluster_size);
    AddCowHeader h = s->header;
    Error *local_err = NULL;
    int ret;

    /* (1) */
    ret = add_cow_cache_write(s->cache);
    if (ret < 0) {
        error_setg_errno(errp, -ret, "Could not write the bitmap");
        return ret;
    }
    /* (2) */
    h.virtual_size = offset;
    h.bitmap_size = add_cow_bitmap_size(nb_clusters);
    ret = add_cow_update_header(bs, &h);
    if (ret < 0) {
        error_setg_errno(errp, -ret, "Could not write the add-cow header");
        return ret;
    }
    add_cow_set_geometry(s);
    add_cow_cache_truncate(s->cache, nb_clusters);

    /* (3) */
    ret = add_cow_cache_clear_from(s->cache, nb_clusters,
                                   old_bitmap_size);
    if (ret == 0) {
        ret = add_cow_cache_recount(s->cache);
    }
    if (ret < 0) {
        warn_report("add-cow: shrunk '%s', but could not clear the bitmap "
                    "bits past the new end (%s); qemu-img check -r leaks "
                    "clears them", bs->filename, strerror(-ret));
    }
    /* (4) */
    if (image_len > offset &&
        bdrv_co_truncate(s->image, offset, false, PREALLOC_MODE_OFF, 0,
                         &local_err) < 0) {
        warn_reportf_err(local_err, "add-cow: shrunk '%s', but its image "
                         "file keeps its length: ", bs->filename);
    }
    return 0;
}

static int coroutine_fn GRAPH_RDLOCK
add_cow_co_truncate(BlockDriverState *bs, int64_t offset, bool exact,
                    PreallocMode prealloc, BdrvRequestFlags flags,
                    Error **errp)
{
    BDRVAddCowState *s = bs->opaque;
    uint64_t old_size = s->header.virtual_size;
    int64_t wait_start, image_len;
    int ret;

    if (!QEMU_IS_ALIGNED(offset, BDRV_SECTOR_SIZE)) {
        error_setg(errp, "add-cow virtual size must be a multiple of 512");
        return -EINVAL;
    }
    if (!s->image) {
        error_setg(errp, "Cannot resize an add-cow image without its image "
                   "file");
        return -ENOTSUP;
    }
    if (offset == old_size) {
        return 0;
    }

    qemu_co_mutex_lock(&s->lock);
    /* Allocating writes near either end must not race with the resize */
    wait_start = QEMU_ALIGN_DOWN(MIN(offset, old_size), s->cluster_size);
    add_cow_wait_all(s, wait_start,
                     ROUND_UP(MAX(offset, old_size), s->cluster_size) -
                     wait_start);

    image_len = bdrv_co_getlength(s->image->bs);
    ret = add_cow_clear_unknown_autoclear(bs);
    if (ret < 0) {
        error_setg_errno(errp, -ret, "Could not clear unknown autoclear "
                         "features");
    } else if (image_len < 0) {
        ret = image_len;
        error_setg_errno(errp, -ret, "Could not get the image file size");
    } else if (offset > old_size) {
        ret = add_cow_grow(bs, offset, image_len, prealloc, flags, errp);
    } else {
        ret = add_cow_shrink(bs, offset, image_len, errp);
    }
    qemu_co_mutex_unlock(&s->lock);
    return ret;
}

/*
 * Empty the image after a commit into its backing file (HMP commit,
 * replication).  The node is drained, so no request holds s->lock or is in
 * flight: an allocating write cannot set a bit between the bitmap clearing
 * and the final discard, which would punch its acknowledged data.
 *
 * Clear the all-allocated flag and every bit, and make that stable before
 * the image data goes away: a crash in between leaves clusters reading the
 * backing file, which commit just made identical.
 */
static int GRAPH_RDLOCK add_cow_do_make_empty(BlockDriverState *bs)
{
    BDRVAddCowState *s = bs->opaque;
    int ret;

    ret = add_cow_clear_unknown_autoclear(bs);
    if (ret == 0) {
        ret = add_cow_flush_cache_sync(bs);
    }
    if (ret < 0) {
        return ret;
    }
    if (add_cow_all_allocated(s)) {
        AddCowHeader h = s->header;

        h.autoclear_features &= ~ADD_COW_AUTOCLEAR_ALL_ALLOCATED;
        ret = add_cow_update_header(bs, &h);
        if (ret < 0) {
            return ret;
        }
    }
    ret = add_cow_cache_zero_all(s->cache);
    if (ret < 0) {
        return ret;
    }
    if (s->image) {
        /* Best effort: the data is unreachable now */
        bdrv_pdiscard(s->image, 0, s->header.virtual_size);
    }
    return 0;
}

static int GRAPH_RDLOCK add_cow_make_empty(BlockDriverState *bs)
{
    int ret;

    bdrv_graph_rdunlock_main_loop();
    bdrv_drained_begin(bs);
    bdrv_graph_rdlock_main_loop();

    ret = add_cow_do_make_empty(bs);

    bdrv_graph_rdunlock_main_loop();
    bdrv_drained_end(bs);
    bdrv_graph_rdlock_main_loop();
    return ret;
}

static void coroutine_fn GRAPH_RDLOCK
add_cow_co_invalidate_cache(BlockDriverState *bs, Error **errp)
{
    ERRP_GUARD();
    BDRVAddCowState *s = bs->opaque;
    BdrvChild *image = s->image;
    QDict *options;
    int ret;

    /*
     * Re-read header and bitmap, but keep the image child: this runs in
     * the I/O path, where children must not be opened or closed.
     */
    add_cow_free_state(s);
    memset(s, 0, sizeof(*s));
    s->bs = bs;
    s->image = image;
    qemu_co_mutex_init(&s->lock);

    options = qdict_clone_shallow(bs->options);
    qemu_co_mutex_lock(&s->lock);
    ret = add_cow_do_open(bs, options, bs->open_flags & ~BDRV_O_INACTIVE,
                          false, errp);
    qemu_co_mutex_unlock(&s->lock);
    qobject_unref(options);
    if (ret < 0) {
        error_prepend(errp, "Could not reopen add-cow layer: ");
        add_cow_free_state(s);
        bs->drv = NULL;
    }
}

static int GRAPH_RDLOCK add_cow_inactivate(BlockDriverState *bs)
{
    int ret = add_cow_flush_cache_sync(bs);

    if (ret < 0) {
        error_report("Failed to flush the add-cow bitmap cache: %s",
                     strerror(-ret));
    }
    return ret;
}

/*
 * The add-cow file's name describes the node only if the image file is the
 * one its header names: otherwise the generic code's json: filename, which
 * includes the image-file child, is the only way to open the same tree.
 */
static void GRAPH_RDLOCK add_cow_refresh_filename(BlockDriverState *bs)
{
    BlockDriverState *file = bs->file ? bs->file->bs : NULL;

    if (add_cow_image_is_default(bs) && file && file->exact_filename[0] &&
        file->drv && file->drv->protocol_name &&
        !qdict_haskey(bs->full_open_options, "backing")) {
        pstrcpy(bs->exact_filename, sizeof(bs->exact_filename),
                file->exact_filename);
    }
}

static const char *const add_cow_strong_runtime_opts[] = {
    "image-file",
    "image-file.",
    NULL
};

static BlockDriver bdrv_add_cow = {
    .format_name                    = "add-cow",
    .instance_size                  = sizeof(BDRVAddCowState),
    .create_opts                    = &add_cow_create_opts,
    .amend_opts                     = &add_cow_amend_opts,
    .is_format                      = true,
    .supports_backing               = true,
    .strong_runtime_opts            = add_cow_strong_runtime_opts,

    .bdrv_probe                     = add_cow_probe,
    .bdrv_open                      = add_cow_open,
    .bdrv_close                     = add_cow_close,
    .bdrv_reopen_prepare            = add_cow_reopen_prepare,
    .bdrv_child_perm                = add_cow_child_perm,
    .bdrv_co_create                 = add_cow_co_create,
    .bdrv_co_create_opts            = add_cow_co_create_opts,
    .bdrv_refresh_limits            = add_cow_refresh_limits,
    .bdrv_has_zero_init             = bdrv_has_zero_init_1,

    .bdrv_co_preadv_part            = add_cow_co_preadv_part,
    .bdrv_co_pwritev_part           = add_cow_co_pwritev_part,
    .bdrv_co_pwrite_zeroes          = add_cow_co_pwrite_zeroes,
    .bdrv_co_pdiscard               = add_cow_co_pdiscard,
    .bdrv_co_flush_to_os            = add_cow_co_flush_to_os,
    .bdrv_co_block_status           = add_cow_co_block_status,

    .bdrv_co_getlength              = add_cow_co_getlength,
    .bdrv_refresh_filename          = add_cow_refresh_filename,
    .bdrv_co_get_allocated_file_size = add_cow_co_get_allocated_file_size,
    .bdrv_co_get_info               = add_cow_co_get_info,
    .bdrv_get_specific_info         = add_cow_get_specific_info,
    .bdrv_co_change_backing_file    = add_cow_co_change_backing_file,
    .bdrv_co_truncate               = add_cow_co_truncate,
    .bdrv_make_empty                = add_cow_make_empty,
    .bdrv_co_check                  = add_cow_co_check,
    .bdrv_measure                   = add_cow_measure,
    .bdrv_amend_options             = add_cow_amend_options,
    .bdrv_co_invalidate_cache       = add_cow_co_invalidate_cache,
    .bdrv_inactivate                = add_cow_inactivate,
};

static void bdrv_add_cow_init(void)
{
    bdrv_register(&bdrv_add_cow);
}

block_init(bdrv_add_cow_init);
