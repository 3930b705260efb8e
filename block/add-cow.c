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
#include "block/qdict.h"
#include "qapi/error.h"
#include "qapi/qapi-visit-block-core.h"
#include "qapi/qobject-input-visitor.h"
#include "qobject/qdict.h"
#include "qemu/bswap.h"
#include "qemu/cutils.h"
#include "qemu/error-report.h"
#include "qemu/memalign.h"
#include "qemu/module.h"
#include "qemu/option.h"
#include "qemu/range.h"
#include "system/block-backend.h"
#include "qemu/main-loop.h"
#include "add-cow.h"
#include "trace.h"

static QemuOptsList add_cow_create_opts;

static QemuOptsList add_cow_runtime_opts = {
    .name = "add-cow",
    .head = QTAILQ_HEAD_INITIALIZER(add_cow_runtime_opts.head),
    .desc = {
        {
            .name = ADD_COW_OPT_CACHE_SIZE,
            .type = QEMU_OPT_SIZE,
            .help = "Maximum bitmap cache size",
        },
        {
            .name = ADD_COW_OPT_BREAK_ORDERING,
            .type = QEMU_OPT_STRING,
            .help = "Test only: break the write ordering (skip-image-flush, "
                    "flush-metadata, bit-before-data)",
        },
        { /* end of list */ }
    },
};

static const char *const add_cow_break_names[] = {
    [ADD_COW_BREAK_NONE] = "none",
    [ADD_COW_BREAK_SKIP_IMAGE_FLUSH] = "skip-image-flush",
    [ADD_COW_BREAK_FLUSH_METADATA] = "flush-metadata",
    [ADD_COW_BREAK_BIT_BEFORE_DATA] = "bit-before-data",
};

static int add_cow_probe(const uint8_t *buf, int buf_size,
                         const char *filename)
{
    if (buf_size < 4) {
        return 0;
    }
    return ldl_le_p(buf) == ADD_COW_MAGIC ? 100 : 0;
}

static void add_cow_header_le_to_cpu(const AddCowHeader *le,
                                     AddCowHeader *cpu)
{
    *cpu = *le;
    cpu->magic = le32_to_cpu(le->magic);
    cpu->header_size = le32_to_cpu(le->header_size);
    cpu->cluster_bits = le32_to_cpu(le->cluster_bits);
    cpu->reserved0 = le32_to_cpu(le->reserved0);
    cpu->incompatible_features = le64_to_cpu(le->incompatible_features);
    cpu->compatible_features = le64_to_cpu(le->compatible_features);
    cpu->autoclear_features = le64_to_cpu(le->autoclear_features);
    cpu->virtual_size = le64_to_cpu(le->virtual_size);
    cpu->bitmap_offset = le64_to_cpu(le->bitmap_offset);
    cpu->bitmap_size = le64_to_cpu(le->bitmap_size);
    cpu->image_name_offset = le32_to_cpu(le->image_name_offset);
    cpu->image_name_size = le32_to_cpu(le->image_name_size);
    cpu->backing_name_offset = le32_to_cpu(le->backing_name_offset);
    cpu->backing_name_size = le32_to_cpu(le->backing_name_size);
}

static void add_cow_header_cpu_to_le(const AddCowHeader *cpu,
                                     AddCowHeader *le)
{
    *le = *cpu;
    le->magic = cpu_to_le32(cpu->magic);
    le->header_size = cpu_to_le32(cpu->header_size);
    le->cluster_bits = cpu_to_le32(cpu->cluster_bits);
    le->reserved0 = cpu_to_le32(cpu->reserved0);
    le->incompatible_features = cpu_to_le64(cpu->incompatible_features);
    le->compatible_features = cpu_to_le64(cpu->compatible_features);
    le->autoclear_features = cpu_to_le64(cpu->autoclear_features);
    le->virtual_size = cpu_to_le64(cpu->virtual_size);
    le->bitmap_offset = cpu_to_le64(cpu->bitmap_offset);
    le->bitmap_size = cpu_to_le64(cpu->bitmap_size);
    le->image_name_offset = cpu_to_le32(cpu->image_name_offset);
    le->image_name_size = cpu_to_le32(cpu->image_name_size);
    le->backing_name_offset = cpu_to_le32(cpu->backing_name_offset);
    le->backing_name_size = cpu_to_le32(cpu->backing_name_size);
}

static bool add_cow_all_allocated(BDRVAddCowState *s)
{
    return s->header.autoclear_features & ADD_COW_AUTOCLEAR_ALL_ALLOCATED;
}

/* A format field must be a non-empty NUL-terminated string */
static bool add_cow_fmt_valid(const char *fmt, bool may_be_empty)
{
    size_t len = strnlen(fmt, ADD_COW_FMT_SIZE);
    size_t i;

    if (len == ADD_COW_FMT_SIZE || (len == 0 && !may_be_empty)) {
        return false;
    }
    for (i = len; i < ADD_COW_FMT_SIZE; i++) {
        if (fmt[i]) {
            return false;
        }
    }
    for (i = 0; i < len; i++) {
        if (!g_ascii_isalnum(fmt[i]) && fmt[i] != '-' && fmt[i] != '_') {
            return false;
        }
    }
    return true;
}

static int add_cow_check_name_range(const AddCowHeader *h, const char *what,
                                    uint32_t offset, uint32_t size,
                                    Error **errp)
{
    if (offset < ADD_COW_NAME_AREA_START || offset >= h->header_size ||
        size > ADD_COW_MAX_NAME_SIZE || size > h->header_size - offset) {
        error_setg(errp, "Invalid %s name location in the add-cow header "
                   "(offset %" PRIu32 ", size %" PRIu32 ", header size %"
                   PRIu32 ")", what, offset, size, h->header_size);
        return -EINVAL;
    }
    return 0;
}

/*
 * Validate every field of the fixed header.  @file_size is the length of
 * the .add-cow file.  Arithmetic is done so that no field value can
 * overflow it.
 */
static int add_cow_validate_header(const AddCowHeader *h, int64_t file_size,
                                   Error **errp)
{
    uint64_t cluster_size, nb_clusters, unknown;
    int ret;

    if (h->magic != ADD_COW_MAGIC) {
        error_setg(errp, "Image is not in add-cow format (bad magic)");
        return -EINVAL;
    }
    unknown = h->incompatible_features & ~ADD_COW_INCOMPAT_MASK;
    if (unknown) {
        error_setg(errp, "Unsupported add-cow incompatible feature bit(s) "
                   "0x%" PRIx64 " (bit %d)", unknown, ctz64(unknown));
        return -ENOTSUP;
    }
    if (h->header_size < ADD_COW_MIN_HEADER_SIZE ||
        h->header_size > ADD_COW_MAX_HEADER_SIZE ||
        !QEMU_IS_ALIGNED(h->header_size, BDRV_SECTOR_SIZE)) {
        error_setg(errp, "Invalid add-cow header size %" PRIu32 " (must be a "
                   "multiple of 512 between %d and %d)", h->header_size,
                   ADD_COW_MIN_HEADER_SIZE, ADD_COW_MAX_HEADER_SIZE);
        return -EINVAL;
    }
    if (h->cluster_bits < ADD_COW_MIN_CLUSTER_BITS ||
        h->cluster_bits > ADD_COW_MAX_CLUSTER_BITS) {
        error_setg(errp, "Invalid add-cow cluster_bits %" PRIu32 " (must be "
                   "between %d and %d)", h->cluster_bits,
                   ADD_COW_MIN_CLUSTER_BITS, ADD_COW_MAX_CLUSTER_BITS);
        return -EINVAL;
    }
    if (h->reserved0 || !buffer_is_zero(h->reserved1,
                                        sizeof(h->reserved1))) {
        error_setg(errp, "Reserved fields of the add-cow header are not "
                   "zero");
        return -EINVAL;
    }
    if (h->virtual_size > BDRV_MAX_LENGTH ||
        !QEMU_IS_ALIGNED(h->virtual_size, BDRV_SECTOR_SIZE)) {
        error_setg(errp, "Invalid add-cow virtual size %" PRIu64 " (must be "
                   "a multiple of 512, at most %" PRId64 ")",
                   h->virtual_size, (int64_t)BDRV_MAX_LENGTH);
        return -EINVAL;
    }

    cluster_size = 1ULL << h->cluster_bits;
    nb_clusters = DIV_ROUND_UP(h->virtual_size, cluster_size);
    if (h->bitmap_size != add_cow_bitmap_size(nb_clusters)) {
        error_setg(errp, "Invalid add-cow bitmap size %" PRIu64 " (expected "
                   "%" PRIu64 " for %" PRIu64 " clusters)", h->bitmap_size,
                   add_cow_bitmap_size(nb_clusters), nb_clusters);
        return -EINVAL;
    }
    if (h->bitmap_offset < h->header_size ||
        !QEMU_IS_ALIGNED(h->bitmap_offset, BDRV_SECTOR_SIZE) ||
        h->bitmap_offset > INT64_MAX - h->bitmap_size) {
        error_setg(errp, "Invalid add-cow bitmap offset %" PRIu64 " (must be "
                   "a multiple of 512, not below the header size %" PRIu32
                   ")", h->bitmap_offset, h->header_size);
        return -EINVAL;
    }
    if (h->bitmap_offset + h->bitmap_size > file_size) {
        error_setg(errp, "add-cow file is truncated: the bitmap ends at %"
                   PRIu64 " but the file is only %" PRId64 " bytes long",
                   h->bitmap_offset + h->bitmap_size, file_size);
        return -EINVAL;
    }

    ret = add_cow_check_name_range(h, "image file", h->image_name_offset,
                                   h->image_name_size, errp);
    if (ret < 0) {
        return ret;
    }
    if (h->image_name_size == 0) {
        error_setg(errp, "The add-cow header names no image file");
        return -EINVAL;
    }
    if (!add_cow_fmt_valid(h->image_format, false)) {
        error_setg(errp, "Invalid image file format field in the add-cow "
                   "header");
        return -EINVAL;
    }

    if (h->backing_name_offset == 0 && h->backing_name_size == 0) {
        if (h->backing_format[0] || !add_cow_fmt_valid(h->backing_format,
                                                       true)) {
            error_setg(errp, "add-cow header has a backing file format but "
                       "no backing file");
            return -EINVAL;
        }
    } else {
        ret = add_cow_check_name_range(h, "backing file",
                                       h->backing_name_offset,
                                       h->backing_name_size, errp);
        if (ret < 0) {
            return ret;
        }
        if (h->backing_name_size == 0) {
            error_setg(errp, "Invalid backing file name size 0 in the "
                       "add-cow header");
            return -EINVAL;
        }
        if (!add_cow_fmt_valid(h->backing_format, false)) {
            error_setg(errp, "Invalid backing file format field in the "
                       "add-cow header");
            return -EINVAL;
        }
        if (ranges_overlap(h->image_name_offset, h->image_name_size,
                           h->backing_name_offset, h->backing_name_size)) {
            error_setg(errp, "Image and backing file names overlap in the "
                       "add-cow header");
            return -EINVAL;
        }
    }
    return 0;
}

/* Read a name from the header area; it must not contain NUL bytes */
static int coroutine_fn GRAPH_RDLOCK
add_cow_read_name(BlockDriverState *bs, const char *what, uint32_t offset,
                  uint32_t size, char **name, Error **errp)
{
    g_autofree char *buf = g_malloc(size + 1);
    int ret;

    ret = bdrv_co_pread(bs->file, offset, size, buf, 0);
    if (ret < 0) {
        error_setg_errno(errp, -ret, "Could not read the %s name", what);
        return ret;
    }
    buf[size] = '\0';
    if (strlen(buf) != size) {
        error_setg(errp, "The %s name in the add-cow header contains a NUL "
                   "byte", what);
        return -EINVAL;
    }
    *name = g_steal_pointer(&buf);
    return 0;
}

/*
 * Image file names in a header are plain file names.  A "json:" or
 * "protocol:" string would be parsed by the block layer and could make
 * QEMU open arbitrary nodes (the CVE-2024-4467 class), so refuse them
 * outright instead of relying on the open path to ignore the prefix.
 */
static int add_cow_check_image_name(const char *name, Error **errp)
{
    if (strstart(name, "json:", NULL) || path_has_protocol(name)) {
        error_setg(errp, "The image file name '%s' in the add-cow header "
                   "is not a plain file name", name);
        return -EINVAL;
    }
    return 0;
}

/*
 * Write the fixed header and flush the .add-cow file.  Sector 0 is
 * rewritten as a whole (one sector-atomic write): after a crash it is
 * either completely old or completely new.  Names that share the sector
 * were made stable before the header points at them.
 */
static int coroutine_mixed_fn GRAPH_RDLOCK
add_cow_write_header(BlockDriverState *bs, const AddCowHeader *h)
{
    uint8_t *buf = qemu_blockalign(bs->file->bs, BDRV_SECTOR_SIZE);
    int ret;

    trace_add_cow_write_header(bs, h->virtual_size, h->autoclear_features);
    ret = bdrv_pread(bs->file, 0, BDRV_SECTOR_SIZE, buf, 0);
    if (ret == 0) {
        add_cow_header_cpu_to_le(h, (AddCowHeader *)buf);
        ret = bdrv_pwrite(bs->file, 0, BDRV_SECTOR_SIZE, buf, 0);
    }
    if (ret == 0) {
        ret = bdrv_flush(bs->file->bs);
    }
    qemu_vfree(buf);
    return ret;
}

static void add_cow_set_geometry(BDRVAddCowState *s)
{
    s->cluster_size = 1U << s->header.cluster_bits;
    s->nb_clusters = DIV_ROUND_UP(s->header.virtual_size, s->cluster_size);
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

static int add_cow_parse_runtime(BlockDriverState *bs, QDict *options,
                                 Error **errp)
{
    BDRVAddCowState *s = bs->opaque;
    g_autoptr(QemuOpts) opts = NULL;
    const char *brk;
    int i;

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
    s->break_ordering = ADD_COW_BREAK_NONE;
    brk = qemu_opt_get(opts, ADD_COW_OPT_BREAK_ORDERING);
    if (brk) {
        for (i = 0; i < ARRAY_SIZE(add_cow_break_names); i++) {
            if (!strcmp(brk, add_cow_break_names[i])) {
                s->break_ordering = i;
                break;
            }
        }
        if (i == ARRAY_SIZE(add_cow_break_names)) {
            error_setg(errp, "Invalid value '%s' for add-cow option "
                       ADD_COW_OPT_BREAK_ORDERING, brk);
            return -EINVAL;
        }
        warn_report("add-cow: write ordering deliberately broken (%s); "
                    "for testing only", brk);
    }
    return 0;
}

static int coroutine_fn GRAPH_RDLOCK
add_cow_do_open(BlockDriverState *bs, QDict *options, int flags,
                bool open_image, Error **errp)
{
    BDRVAddCowState *s = bs->opaque;
    AddCowHeader le;
    g_autofree char *backing = NULL;
    int64_t file_size;
    uint32_t entry_bytes;
    int ret;

    ret = add_cow_parse_runtime(bs, options, errp);
    if (ret < 0) {
        return ret;
    }

    file_size = bdrv_co_getlength(bs->file->bs);
    if (file_size < 0) {
        error_setg_errno(errp, -file_size, "Could not get the add-cow file "
                         "size");
        return file_size;
    }
    ret = bdrv_co_pread(bs->file, 0, sizeof(le), &le, 0);
    if (ret < 0) {
        error_setg_errno(errp, -ret, "Could not read the add-cow header");
        return ret;
    }
    add_cow_header_le_to_cpu(&le, &s->header);
    if (file_size < sizeof(le)) {
        error_setg(errp, "add-cow file is truncated: %" PRId64 " bytes is "
                   "shorter than the header", file_size);
        return -EINVAL;
    }
    ret = add_cow_validate_header(&s->header, file_size, errp);
    if (ret < 0) {
        return ret;
    }
    add_cow_set_geometry(s);

    ret = add_cow_read_name(bs, "image file", s->header.image_name_offset,
                            s->header.image_name_size, &s->image_name, errp);
    if (ret < 0) {
        return ret;
    }
    ret = add_cow_check_image_name(s->image_name, errp);
    if (ret < 0) {
        return ret;
    }
    /*
     * Only raw image files, as for qcow2's data file: any other format
     * could name further files (even this one) from inside an untrusted
     * image.  A user who wants another driver passes an image-file node.
     */
    if (strcmp(s->header.image_format, "raw")) {
        error_setg(errp, "Unsupported image file format '%s' in the add-cow "
                   "header (only raw is supported)", s->header.image_format);
        return -ENOTSUP;
    }

    if (s->header.backing_name_size) {
        ret = add_cow_read_name(bs, "backing file",
                                s->header.backing_name_offset,
                                s->header.backing_name_size, &backing, errp);
        if (ret < 0) {
            return ret;
        }
    }
    /* Keep auto_backing_file across invalidate_cache (see qcow2) */
    if (g_strcmp0(backing ?: "", bs->backing_file)) {
        pstrcpy(bs->backing_file, sizeof(bs->backing_file), backing ?: "");
        pstrcpy(bs->auto_backing_file, sizeof(bs->auto_backing_file),
                backing ?: "");
    }
    pstrcpy(bs->backing_format, sizeof(bs->backing_format),
            s->header.backing_format);

    bs->total_sectors = s->header.virtual_size / BDRV_SECTOR_SIZE;
    bs->supported_zero_flags = BDRV_REQ_MAY_UNMAP | BDRV_REQ_NO_FALLBACK;
    bs->supported_truncate_flags = BDRV_REQ_ZERO_WRITE;

    if (open_image && (flags & BDRV_O_NO_IO)) {
        /*
         * Like qcow2's data file: qemu-img info must be able to inspect an
         * untrusted image without opening the file its header names.
         */
        qdict_extract_subqdict(options, NULL, "image-file.");
        qdict_del(options, "image-file");
    } else if (open_image) {
        bdrv_graph_co_rdunlock();
        ret = add_cow_open_image(bs, options, errp);
        bdrv_graph_co_rdlock();
        if (ret < 0) {
            return ret;
        }
    }

    /* The .add-cow file holds no guest data */
    bs->file->role &= ~BDRV_CHILD_DATA;
    bdrv_child_refresh_perms(bs, bs->file, &error_abort);

    entry_bytes = MIN(MAX(s->cluster_size, 4096), 65536);
    s->cache = add_cow_cache_create(bs->file, s->image,
                                    s->header.bitmap_offset, s->nb_clusters,
                                    entry_bytes, s->cache_size);
    add_cow_cache_set_break_ordering(s->cache, s->break_ordering);
    QLIST_INIT(&s->inflight);

    /* Unknown autoclear bits describe state we would not maintain */
    if ((flags & BDRV_O_RDWR) && !(flags & BDRV_O_INACTIVE) &&
        (s->header.autoclear_features & ~ADD_COW_AUTOCLEAR_MASK)) {
        s->header.autoclear_features &= ADD_COW_AUTOCLEAR_MASK;
        ret = add_cow_write_header(bs, &s->header);
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
 * Fill @buf with the current content of [@offset, @offset + @bytes) of
 * an unallocated area (the copy-on-write source).
 */
static int coroutine_fn GRAPH_RDLOCK
add_cow_read_cow(BlockDriverState *bs, int64_t offset, int64_t bytes,
                 void *buf)
{
    QEMUIOVector qiov;

    if (!bytes) {
        return 0;
    }
    BLKDBG_CO_EVENT(bs->file, BLKDBG_COW_READ);
    qemu_iovec_init_buf(&qiov, buf, bytes);
    return add_cow_read_backing(bs, offset, bytes, &qiov, 0);
}

/*
 * Largest guest write between two copy-on-write areas for which the areas
 * are read from the backing file in one request
 */
#define ADD_COW_COW_MERGE_GAP   (64 * 1024)

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
    QEMUIOVector local;
    void *head_buf = NULL, *tail_buf = NULL;
    int ret;

    trace_add_cow_alloc_write(bs, offset, bytes, cow_start, cow_end);

    if (!head && !tail) {
        BLKDBG_CO_EVENT(bs->file, BLKDBG_WRITE_AIO);
        return bdrv_co_pwritev_part(s->image, offset, bytes, qiov,
                                    qiov_offset, 0);
    }

    qemu_iovec_init(&local, qiov->niov + 2);
    if (head && tail && bytes <= ADD_COW_COW_MERGE_GAP) {
        /*
         * Both ends need copy-on-write and the guest data between them is
         * small: one backing read of the whole range costs less than two
         * requests (qcow2 does the same).  The middle of the buffer, which
         * the guest data replaces, is read and dropped.
         */
        head_buf = qemu_try_blockalign(s->image->bs, cow_end - cow_start);
        if (!head_buf) {
            ret = -ENOMEM;
            goto out;
        }
        ret = add_cow_read_cow(bs, cow_start, cow_end - cow_start, head_buf);
        if (ret < 0) {
            goto out;
        }
        qemu_iovec_add(&local, head_buf, head);
        qemu_iovec_concat(&local, qiov, qiov_offset, bytes);
        qemu_iovec_add(&local, (uint8_t *)head_buf + head + bytes, tail);
        goto write;
    }
    if (head) {
        head_buf = qemu_try_blockalign(s->image->bs, head);
        if (!head_buf) {
            ret = -ENOMEM;
            goto out;
        }
        ret = add_cow_read_cow(bs, cow_start, head, head_buf);
        if (ret < 0) {
            goto out;
        }
        qemu_iovec_add(&local, head_buf, head);
    }
    qemu_iovec_concat(&local, qiov, qiov_offset, bytes);
    if (tail) {
        tail_buf = qemu_try_blockalign(s->image->bs, tail);
        if (!tail_buf) {
            ret = -ENOMEM;
            goto out;
        }
        ret = add_cow_read_cow(bs, offset + bytes, tail, tail_buf);
        if (ret < 0) {
            goto out;
        }
        qemu_iovec_add(&local, tail_buf, tail);
    }

write:

    BLKDBG_CO_EVENT(bs->file, BLKDBG_COW_WRITE);
    if (local.niov > IOV_MAX) {
        /* Too many segments for one request: write the pieces in turn */
        size_t done = 0;
        int64_t piece;

        while (done < local.size) {
            piece = MIN(local.size - done, 1024 * 1024);
            ret = bdrv_co_pwritev_part(s->image, cow_start + done, piece,
                                       &local, done, 0);
            if (ret < 0) {
                goto out;
            }
            done += piece;
        }
        ret = 0;
    } else {
        ret = bdrv_co_pwritev(s->image, cow_start, local.size, &local, 0);
    }

out:
    qemu_iovec_destroy(&local);
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
    int ret;

    ret = add_cow_cache_set(s->cache, first, last - first + 1, true);
    if (ret == 0 && s->break_ordering == ADD_COW_BREAK_BIT_BEFORE_DATA) {
        ret = add_cow_cache_write(s->cache);
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
    BlockReq req;
    bool allocated;
    int64_t n;
    int ret;

    qemu_co_mutex_lock(&s->lock);
    for (;;) {
        n = add_cow_find_run(s, offset, bytes, &allocated);
        if (n < 0) {
            qemu_co_mutex_unlock(&s->lock);
            return n;
        }
        if (allocated && n == bytes) {
            /* Fast path: everything is in the image file already */
            qemu_co_mutex_unlock(&s->lock);
            if (!qiov) {
                return bdrv_co_pwrite_zeroes(s->image, offset, bytes, flags);
            }
            BLKDBG_CO_EVENT(bs->file, BLKDBG_WRITE_AIO);
            return bdrv_co_pwritev_part(s->image, offset, bytes, qiov,
                                        qiov_offset, 0);
        }
        /* Serialize against other allocations of the same clusters */
        if (!reqlist_wait_one(&s->inflight, start, end - start, &s->lock)) {
            break;
        }
    }
    reqlist_init_req(&s->inflight, &req, start, end - start);

    while (bytes > 0) {
        n = add_cow_find_run(s, offset, bytes, &allocated);
        if (n < 0) {
            ret = n;
            goto out;
        }
        qemu_co_mutex_unlock(&s->lock);

        if (allocated && qiov) {
            BLKDBG_CO_EVENT(bs->file, BLKDBG_WRITE_AIO);
            ret = bdrv_co_pwritev_part(s->image, offset, n, qiov,
                                       qiov_offset, 0);
        } else if (allocated) {
            ret = bdrv_co_pwrite_zeroes(s->image, offset, n, flags);
        } else {
            int64_t cow_start = QEMU_ALIGN_DOWN(offset, s->cluster_size);
            int64_t cow_end = MIN(ROUND_UP(offset + n, s->cluster_size),
                                  (int64_t)s->header.virtual_size);

            if (s->break_ordering == ADD_COW_BREAK_BIT_BEFORE_DATA) {
                qemu_co_mutex_lock(&s->lock);
                ret = add_cow_mark_allocated(s, cow_start, cow_end);
                qemu_co_mutex_unlock(&s->lock);
                if (ret < 0) {
                    qemu_co_mutex_lock(&s->lock);
                    goto out;
                }
            }
            if (!qiov) {
                /*
                 * add_cow_co_pwrite_zeroes() only passes whole clusters,
                 * so there is nothing to copy from the backing file
                 */
                ret = bdrv_co_pwrite_zeroes(s->image, offset, n, flags);
            } else {
                ret = add_cow_write_alloc(bs, cow_start, cow_end, offset, n,
                                          qiov, qiov_offset);
            }
            if (ret == 0 && s->break_ordering !=
                ADD_COW_BREAK_BIT_BEFORE_DATA) {
                /* The data is written: now the bits may be set */
                qemu_co_mutex_lock(&s->lock);
                ret = add_cow_mark_allocated(s, cow_start, cow_end);
                qemu_co_mutex_unlock(&s->lock);
            }
        }
        qemu_co_mutex_lock(&s->lock);
        if (ret < 0) {
            goto out;
        }
        offset += n;
        bytes -= n;
        qiov_offset += n;
    }
    ret = 0;

out:
    reqlist_remove_req(&req);
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
    if (!bs->backing && !(flags & BDRV_REQ_NO_FALLBACK)) {
        bool allocated;
        int64_t n;

        /* Without a backing file, unallocated clusters read as zeros */
        qemu_co_mutex_lock(&s->lock);
        n = add_cow_find_run(s, offset, bytes, &allocated);
        qemu_co_mutex_unlock(&s->lock);
        if (n == bytes && !allocated) {
            return 0;
        }
    }
    return add_cow_do_write(bs, offset, bytes, NULL, 0,
                            flags & (BDRV_REQ_MAY_UNMAP |
                                     BDRV_REQ_NO_FALLBACK));
}

/*
 * Discard whole clusters.
 *
 * With a backing file (or the all-allocated flag) the bits stay: clearing
 * them would make older backing data reappear, and the flag needs a full
 * bitmap.  Only the image file drops the data (a hole reads zeros).
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
    BlockReq req;
    int ret;

    if (!QEMU_IS_ALIGNED(offset, s->cluster_size) ||
        (!QEMU_IS_ALIGNED(end, s->cluster_size) &&
         end != s->header.virtual_size)) {
        return -ENOTSUP;
    }
    if (bs->backing || add_cow_all_allocated(s)) {
        return bdrv_co_pdiscard(s->image, offset, bytes);
    }

    first = offset >> s->header.cluster_bits;
    count = DIV_ROUND_UP(bytes, s->cluster_size);
    qemu_co_mutex_lock(&s->lock);
    reqlist_wait_all(&s->inflight, offset, bytes, &s->lock);
    reqlist_init_req(&s->inflight, &req, offset, bytes);
    ret = add_cow_cache_set(s->cache, first, count, false);
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
    reqlist_remove_req(&req);
    qemu_co_mutex_unlock(&s->lock);
    return ret;
}

static int coroutine_fn GRAPH_RDLOCK add_cow_co_flush_to_os(
    BlockDriverState *bs)
{
    BDRVAddCowState *s = bs->opaque;
    int ret;

    /*
     * Image flush, then the dirty bitmap entries.  The block layer then
     * flushes both children, which makes the bitmap itself stable.
     */
    qemu_co_mutex_lock(&s->lock);
    ret = add_cow_cache_write(s->cache);
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

/*
 * Count the set bits of the bitmap without flushing anything: entries in
 * the cache are authoritative, the rest is read from disk.
 */
static int64_t GRAPH_RDLOCK add_cow_count_allocated(BlockDriverState *bs)
{
    BDRVAddCowState *s = bs->opaque;
    uint32_t chunk = add_cow_cache_entry_bytes(s->cache);
    g_autofree unsigned long *bits = bitmap_new(chunk * 8);
    g_autofree unsigned long *buf = bitmap_new(chunk * 8);
    const unsigned long *cached;
    uint64_t pos, nbits, count = 0;
    int64_t index;
    int ret;

    if (add_cow_all_allocated(s)) {
        return s->nb_clusters;
    }
    for (pos = 0; pos * 8 < s->nb_clusters; pos += chunk) {
        uint64_t len = MIN(chunk, s->header.bitmap_size - pos);

        index = pos / chunk;
        nbits = MIN((uint64_t)chunk * 8, s->nb_clusters - pos * 8);
        memset(buf, 0, chunk);
        ret = bdrv_pread(bs->file, s->header.bitmap_offset + pos, len, buf,
                         0);
        if (ret < 0) {
            return ret;
        }
        /* Looked up after the read, which may have let the cache change */
        cached = add_cow_cache_lookup(s->cache, index);
        if (cached) {
            count += bitmap_count_one(cached, nbits);
        } else {
            bitmap_from_le(bits, buf, chunk * 8);
            count += bitmap_count_one(bits, nbits);
        }
    }
    return count;
}

static ImageInfoSpecific * GRAPH_RDLOCK
add_cow_get_specific_info(BlockDriverState *bs, Error **errp)
{
    BDRVAddCowState *s = bs->opaque;
    ImageInfoSpecific *spec = g_new0(ImageInfoSpecific, 1);
    ImageInfoSpecificAddCow *info = g_new0(ImageInfoSpecificAddCow, 1);
    int64_t allocated = -1;

    /* Counting reads the whole bitmap: skip it for huge ones */
    if (s->header.bitmap_size <= 64 * 1024 * 1024) {
        allocated = add_cow_count_allocated(bs);
    }

    *info = (ImageInfoSpecificAddCow) {
        .image_file = g_strdup(s->image_name),
        .image_format = g_strdup(s->header.image_format),
        .backing_format = s->header.backing_format[0] ?
                          g_strdup(s->header.backing_format) : NULL,
        .cluster_size = s->cluster_size,
        .has_allocated_clusters = allocated >= 0,
        .allocated_clusters = MAX(allocated, 0),
        .total_clusters = s->nb_clusters,
        .all_allocated = add_cow_all_allocated(s),
    };
    spec->type = IMAGE_INFO_SPECIFIC_KIND_ADD_COW;
    spec->u.add_cow.data = info;
    return spec;
}

/*
 * Find @size free bytes in the name area that overlap neither name, so a
 * name can be replaced without ever making the header point at a torn one.
 */
static uint32_t add_cow_find_name_space(BDRVAddCowState *s, uint32_t size)
{
    uint32_t pos = ADD_COW_NAME_AREA_START;
    const AddCowHeader *h = &s->header;

    while (pos + size <= h->header_size) {
        if (ranges_overlap(pos, size, h->image_name_offset,
                           h->image_name_size)) {
            pos = h->image_name_offset + h->image_name_size;
        } else if (h->backing_name_size &&
                   ranges_overlap(pos, size, h->backing_name_offset,
                                  h->backing_name_size)) {
            pos = h->backing_name_offset + h->backing_name_size;
        } else {
            return pos;
        }
    }
    return 0;
}

/*
 * Before the backing file is dropped: every unallocated cluster would read
 * zeros without it, so write zeros there in the image file (a hole where
 * the image file supports it) and mark those clusters allocated.  Order:
 * zeros written, image file flushed (the cache does that before it writes
 * a set bit), bits written, .add-cow file flushed; only then may the caller
 * set the all-allocated flag in s->header and write sector 0.
 * Caller holds s->lock.
 */
static int coroutine_fn GRAPH_RDLOCK
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
    reqlist_wait_all(&s->inflight, 0, s->header.virtual_size, &s->lock);

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
    ret = bdrv_co_flush(bs->file->bs);
    if (ret < 0) {
        return ret;
    }
    s->header.autoclear_features |= ADD_COW_AUTOCLEAR_ALL_ALLOCATED;
    return 0;
}

/*
 * Change the backing file name and format (qemu-img rebase, block-stream,
 * block-commit of the layer below).
 *
 * Write order, and why a crash cannot leave an unusable header:
 *
 *  1. The new name is written into bytes of the name area that neither
 *     name of the header on disk uses (add_cow_find_name_space()), and the
 *     .add-cow file is flushed.  The header on disk does not point there,
 *     so a crash during or after this step leaves the old header with both
 *     old names intact: the image still opens over the old backing file.
 *  2. Only then is sector 0 (the 128-byte fixed part, which holds the name
 *     offsets and sizes and the backing format) rewritten with one
 *     sector-sized write and flushed.  The sector is written as a whole, so
 *     after a crash it is either the old one (old backing file) or the new
 *     one, which points at a name that step 1 made stable.  The name and
 *     its format change together because both live in sector 0.
 *
 * The bytes of the old name are never overwritten while the header on disk
 * still points at them: a later rebase avoids them as long as they are in
 * use, and may reuse them once the header has moved away (the spec lets
 * old names stay behind).
 *
 * Removing the backing file (@backing_file NULL, e.g. "rebase -u -b ''" or
 * streaming down to the bottom) would make every unallocated cluster read
 * zeros.  Instead of relying on that, the unallocated clusters are zeroed
 * in the image file and marked allocated, and the all-allocated flag is set
 * in the same sector-0 write that drops the name (see
 * add_cow_fill_unallocated() for that order).  The image file alone is
 * then the whole disk and can be used as a raw image.
 */
static int coroutine_fn GRAPH_RDLOCK
add_cow_co_change_backing_file(BlockDriverState *bs, const char *backing_file,
                               const char *backing_fmt)
{
    BDRVAddCowState *s = bs->opaque;
    AddCowHeader h;
    size_t len = backing_file ? strlen(backing_file) : 0;
    uint32_t pos = 0;
    int ret;

    if (len > ADD_COW_MAX_NAME_SIZE) {
        error_report("Backing file name '%s' is too long for add-cow "
                     "(at most %d bytes)", backing_file,
                     ADD_COW_MAX_NAME_SIZE);
        return -EINVAL;
    }
    if (len && (!backing_fmt || !backing_fmt[0] ||
                strlen(backing_fmt) >= ADD_COW_FMT_SIZE)) {
        error_report("add-cow needs a backing format of 1 to %d characters",
                     ADD_COW_FMT_SIZE - 1);
        return -EINVAL;
    }
    if (!s->image) {
        return -ENOTSUP;
    }

    qemu_co_mutex_lock(&s->lock);
    /*
     * Step 0: every allocation made so far (e.g. the clusters a safe
     * rebase just copied) must be stable, bits included, before the
     * header names another backing file; otherwise a crash would let
     * those clusters read the new backing file's data.
     */
    ret = add_cow_cache_write(s->cache);
    if (ret == 0) {
        ret = bdrv_co_flush(bs->file->bs);
    }
    if (ret < 0) {
        goto out;
    }
    if (len) {
        pos = add_cow_find_name_space(s, len);
        if (!pos) {
            ret = -ENOSPC;
            goto out;
        }
        /* Step 1: the new name, stable before the header points at it */
        ret = bdrv_co_pwrite(bs->file, pos, len, backing_file, 0);
        if (ret < 0) {
            goto out;
        }
        ret = bdrv_co_flush(bs->file->bs);
        if (ret < 0) {
            goto out;
        }
    } else {
        /* No backing file from now on: make the image file the disk */
        ret = add_cow_fill_unallocated(bs);
        if (ret < 0) {
            goto out;
        }
    }

    /* Step 2: sector 0, written whole and flushed */
    h = s->header;
    h.backing_name_offset = pos;
    h.backing_name_size = len;
    memset(h.backing_format, 0, sizeof(h.backing_format));
    if (len) {
        pstrcpy(h.backing_format, sizeof(h.backing_format), backing_fmt);
    }
    ret = add_cow_write_header(bs, &h);
    if (ret < 0) {
        goto out;
    }
    s->header = h;

out:
    qemu_co_mutex_unlock(&s->lock);
    return ret;
}

/*
 * Clear, on disk, every bit from cluster @first up to byte @end of the
 * bitmap (padding bits, or bits past a shrunk bitmap), and flush.  The
 * cache must be clean; it masks such bits anyway, so it stays valid.
 */
static int coroutine_fn GRAPH_RDLOCK
add_cow_clear_bits_from(BlockDriverState *bs, uint64_t first, uint64_t end)
{
    BDRVAddCowState *s = bs->opaque;
    uint64_t first_byte = first / 8;
    uint64_t sector = QEMU_ALIGN_DOWN(first_byte, BDRV_SECTOR_SIZE);
    uint64_t rest = sector + BDRV_SECTOR_SIZE;
    uint8_t *buf;
    int ret = 0;

    if (sector >= end) {
        return 0;
    }
    /* The sector holding bit @first keeps the bits before it */
    buf = qemu_blockalign(bs->file->bs, BDRV_SECTOR_SIZE);
    ret = bdrv_co_pread(bs->file, s->header.bitmap_offset + sector,
                        BDRV_SECTOR_SIZE, buf, 0);
    if (ret == 0) {
        uint64_t i = first_byte - sector;

        if (first % 8) {
            buf[i++] &= (1U << (first % 8)) - 1;
        }
        memset(buf + i, 0, BDRV_SECTOR_SIZE - i);
        ret = bdrv_co_pwrite(bs->file, s->header.bitmap_offset + sector,
                             BDRV_SECTOR_SIZE, buf, 0);
    }
    qemu_vfree(buf);
    if (ret == 0 && rest < end) {
        ret = bdrv_co_pwrite_zeroes(bs->file, s->header.bitmap_offset + rest,
                                    end - rest, 0);
    }
    if (ret == 0) {
        ret = bdrv_co_flush(bs->file->bs);
    }
    return ret;
}

/*
 * Resize.  The order follows the spec ("Resize"):
 *
 * Grow: (1) if the old last cluster is partial and allocated, zero the
 * image file bytes between the old end and the end of that cluster (they
 * become visible); (2) extend the image file if it is shorter than the new
 * size (with the requested preallocation); (3) clear on disk every bit
 * between the old and the new number of clusters, which may be stale from
 * an earlier shrink; (4) flush both files; (5) write the header with the
 * new size, clearing the all-allocated flag if clusters were added.  A
 * crash before (5) leaves the old size and nothing visible changed.
 *
 * Shrink: (1) write and flush the header with the new size, so clusters
 * past the new end disappear at once; (2) clear their bits on disk (now
 * padding or past the bitmap) and flush, so that a later grow can never
 * show them again; (3) truncate the image file.  A crash after (1) leaves
 * at most stale padding bits, which readers ignore and which grow clears.
 */
/*
 * Make [@old_size, @new_size) read zeros in a growing image: the part of
 * an unallocated boundary cluster gets a copy-on-write allocation with a
 * zero tail, whole new clusters are zeroed in the image file and marked
 * allocated.  The cache flushes the image file before it writes the bits.
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

            if (!buf) {
                return -ENOMEM;
            }
            ret = add_cow_read_cow(bs, cow_start, old_size - cow_start, buf);
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

static int coroutine_fn GRAPH_RDLOCK
add_cow_co_truncate(BlockDriverState *bs, int64_t offset, bool exact,
                    PreallocMode prealloc, BdrvRequestFlags flags,
                    Error **errp)
{
    BDRVAddCowState *s = bs->opaque;
    uint64_t old_size = s->header.virtual_size;
    uint64_t old_bitmap_size = s->header.bitmap_size;
    uint64_t nb_clusters = DIV_ROUND_UP(offset, s->cluster_size);
    int64_t wait_start;
    AddCowHeader h;
    int64_t image_len;
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
    reqlist_wait_all(&s->inflight, wait_start,
                     ROUND_UP(MAX(offset, old_size), s->cluster_size) -
                     wait_start, &s->lock);

    image_len = bdrv_co_getlength(s->image->bs);
    if (image_len < 0) {
        ret = image_len;
        error_setg_errno(errp, -ret, "Could not get the image file size");
        goto out;
    }
    h = s->header;
    h.virtual_size = offset;
    h.bitmap_size = add_cow_bitmap_size(nb_clusters);

    if (offset > old_size) {
        /* (1) stale bytes in the allocated partial last cluster */
        if (!QEMU_IS_ALIGNED(old_size, s->cluster_size)) {
            int64_t zend = MIN(MIN(ROUND_UP(old_size, s->cluster_size),
                                   offset), image_len);
            bool allocated;
            int64_t n = add_cow_find_run(s, old_size - 1, 1, &allocated);

            ret = n < 0 ? n : 0;
            if (ret == 0 && allocated && zend > old_size) {
                ret = bdrv_co_pwrite_zeroes(s->image, old_size,
                                            zend - old_size, 0);
            }
            if (ret < 0) {
                error_setg_errno(errp, -ret, "Could not clear the image "
                                 "file past the old end");
                goto out;
            }
        }
        /* (2) */
        if (image_len < offset) {
            ret = bdrv_co_truncate(s->image, offset, false, prealloc, 0,
                                   errp);
            if (ret < 0) {
                goto out;
            }
        }
        /* (3) the cache writes the boundary entry and zeroes the rest */
        ret = add_cow_cache_resize(s->cache, nb_clusters);
        if (ret < 0) {
            error_setg_errno(errp, -ret, "Could not extend the bitmap");
            goto out;
        }
        /*
         * (3b) The backing file reaches into the new area (the block layer
         * asks for BDRV_REQ_ZERO_WRITE): the new area must read zeros as
         * soon as the new size is visible, so zero it in the image file
         * and set its bits now, before the header grows.
         */
        if (flags & BDRV_REQ_ZERO_WRITE) {
            ret = add_cow_zero_new_area(bs, old_size, offset);
            if (ret < 0) {
                error_setg_errno(errp, -ret, "Could not zero the new area");
                goto out;
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
            goto out;
        }
        /* (5) */
        if (nb_clusters > s->nb_clusters) {
            h.autoclear_features &= ~ADD_COW_AUTOCLEAR_ALL_ALLOCATED;
        }
        ret = add_cow_write_header(bs, &h);
        if (ret < 0) {
            error_setg_errno(errp, -ret, "Could not write the add-cow header");
            goto out;
        }
        s->header = h;
        add_cow_set_geometry(s);
    } else {
        /* (1) */
        ret = add_cow_write_header(bs, &h);
        if (ret < 0) {
            error_setg_errno(errp, -ret, "Could not write the add-cow header");
            goto out;
        }
        s->header = h;
        add_cow_set_geometry(s);
        /* (2) cached entries first, then whatever is only on disk */
        ret = add_cow_cache_resize(s->cache, nb_clusters);
        if (ret == 0) {
            ret = add_cow_cache_write(s->cache);
        }
        if (ret == 0) {
            ret = add_cow_clear_bits_from(bs, nb_clusters, old_bitmap_size);
        }
        if (ret < 0) {
            error_setg_errno(errp, -ret, "Could not clear bits past the end");
            goto out;
        }
        /* (3) */
        if (image_len > offset) {
            ret = bdrv_co_truncate(s->image, offset, false,
                                   PREALLOC_MODE_OFF, 0, errp);
            if (ret < 0) {
                goto out;
            }
        }
    }
    ret = 0;

out:
    qemu_co_mutex_unlock(&s->lock);
    return ret;
}

static int GRAPH_RDLOCK add_cow_make_empty(BlockDriverState *bs)
{
    BDRVAddCowState *s = bs->opaque;
    int ret;

    /*
     * Clear the all-allocated flag and every bit, and make that stable
     * before the image data goes away: a crash in between leaves clusters
     * reading the backing file, which commit just made identical.
     */
    ret = add_cow_flush_cache_sync(bs);
    if (ret < 0) {
        return ret;
    }
    if (add_cow_all_allocated(s)) {
        AddCowHeader h = s->header;

        h.autoclear_features &= ~ADD_COW_AUTOCLEAR_ALL_ALLOCATED;
        ret = add_cow_write_header(bs, &h);
        if (ret < 0) {
            return ret;
        }
        s->header = h;
    }
    ret = bdrv_pwrite_zeroes(bs->file, s->header.bitmap_offset,
                             s->header.bitmap_size, 0);
    if (ret < 0) {
        return ret;
    }
    add_cow_cache_discard_all(s->cache);
    ret = bdrv_flush(bs->file->bs);
    if (ret < 0) {
        return ret;
    }
    if (s->image) {
        /* Best effort: the data is unreachable now */
        bdrv_pdiscard(s->image, 0, s->header.virtual_size);
    }
    return 0;
}

/* What a scan of the on-disk bitmap found (see add_cow_scan_bitmap()) */
typedef struct AddCowBitmapScan {
    uint64_t allocated;         /* meaningful bits set */
    uint64_t first_clear;       /* first meaningful bit clear, or nb_clusters */
    uint64_t alloc_end;         /* last meaningful bit set + 1, or 0 */
    uint64_t pad_set;           /* padding bits set */
    uint64_t first_pad;         /* byte of the first padding bit set */
} AddCowBitmapScan;

/*
 * Read the bitmap as it is on disk, padding included (the cache hides the
 * padding bits and trusts the all-allocated flag, so it cannot be used to
 * check either).  The caller has written the cache back.
 */
static int coroutine_fn GRAPH_RDLOCK
add_cow_scan_bitmap(BlockDriverState *bs, AddCowBitmapScan *sc)
{
    BDRVAddCowState *s = bs->opaque;
    const uint64_t chunk = 1024 * 1024;
    uint64_t nb = s->nb_clusters;
    uint64_t pos, len, i;
    uint8_t *buf;
    int ret = 0;

    *sc = (AddCowBitmapScan) { .first_clear = nb };
    buf = qemu_try_blockalign(bs->file->bs, MIN(chunk, s->header.bitmap_size));
    if (!buf && s->header.bitmap_size) {
        return -ENOMEM;
    }
    for (pos = 0; pos < s->header.bitmap_size; pos += len) {
        len = MIN(chunk, s->header.bitmap_size - pos);
        ret = bdrv_co_pread(bs->file, s->header.bitmap_offset + pos, len, buf,
                            0);
        if (ret < 0) {
            break;
        }
        for (i = 0; i < len; i++) {
            uint64_t c0 = (pos + i) * 8;
            uint8_t mask, m, p;

            mask = c0 >= nb ? 0 : nb - c0 >= 8 ? 0xff :
                   (1U << (nb - c0)) - 1;
            m = buf[i] & mask;
            p = buf[i] & ~mask;
            if (p) {
                if (!sc->pad_set) {
                    sc->first_pad = pos + i;
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
    }
    qemu_vfree(buf);
    return ret;
}

/*
 * qemu-img check.  The header was validated by open (an image that breaks a
 * field rule does not open at all), and open also found the image file and
 * the backing file, so what is left are the conditions a reader tolerates:
 *
 *  - padding bits set past the last cluster (a reader ignores them, but a
 *    later grow must not see them): leaks, repaired by clearing them;
 *  - the all-allocated flag set over a clear bit: repaired by clearing the
 *    flag, so that the bitmap decides again (the flag may only be set after
 *    every bit is, so the bitmap is the more trustworthy of the two);
 *  - an image file that ends before an allocated cluster does (that data
 *    reads as zeros, it is lost): repaired by extending the image file to
 *    the virtual size, which makes the loss explicit but keeps the reads;
 *    an image file shorter than the virtual size without allocated data
 *    past its end is only a warning (writes extend it), -r all extends it.
 *
 * Everything is reported on stderr, prefixed with ERROR, Warning or
 * Repairing like the other drivers do.
 */
static int coroutine_fn GRAPH_RDLOCK
add_cow_co_check(BlockDriverState *bs, BdrvCheckResult *result,
                 BdrvCheckMode fix)
{
    BDRVAddCowState *s = bs->opaque;
    const bool repair = fix & BDRV_FIX_ERRORS;
    const bool repair_leaks = fix & BDRV_FIX_LEAKS;
    AddCowBitmapScan sc;
    uint64_t alloc_end;
    int64_t image_len;
    int ret;

    qemu_co_mutex_lock(&s->lock);

    ret = add_cow_cache_write(s->cache);
    if (ret < 0) {
        fprintf(stderr, "ERROR cannot write the bitmap cache: %s\n",
                strerror(-ret));
        result->check_errors++;
        goto out;
    }
    ret = add_cow_scan_bitmap(bs, &sc);
    if (ret < 0) {
        fprintf(stderr, "ERROR cannot read the bitmap: %s\n", strerror(-ret));
        result->check_errors++;
        goto out;
    }

    /*
     * Set padding bits are harmless to readers and are what a crash between
     * a shrink's header update and its bit clearing leaves behind, or a grow
     * that zero-filled the new area (and set its bits) but failed or
     * crashed before its header update; a later grow clears them.  So they
     * count as leaks (like qcow2's leaked clusters), not corruption.
     */
    if (sc.pad_set) {
        fprintf(stderr, "%s %" PRIu64 " bitmap bit(s) past the last cluster "
                "(%" PRIu64 ") are set, the first in bitmap byte %" PRIu64
                "\n", repair_leaks ? "Repairing" : "Leaked", sc.pad_set,
                s->nb_clusters ? s->nb_clusters - 1 : 0, sc.first_pad);
        if (repair_leaks) {
            ret = add_cow_clear_bits_from(bs, s->nb_clusters,
                                          s->header.bitmap_size);
            if (ret < 0) {
                fprintf(stderr, "ERROR cannot clear the padding bits: %s\n",
                        strerror(-ret));
                result->check_errors++;
                goto out;
            }
            result->leaks_fixed += sc.pad_set;
        } else {
            result->leaks += sc.pad_set;
        }
    }

    if (add_cow_all_allocated(s) && sc.first_clear < s->nb_clusters) {
        fprintf(stderr, "%s all-allocated flag is set, but %" PRIu64
                " cluster(s) are not allocated in the bitmap (the first is "
                "cluster %" PRIu64 ")%s\n", repair ? "Repairing" : "ERROR",
                s->nb_clusters - sc.allocated, sc.first_clear,
                repair ? ": clearing the flag, those clusters read from the "
                "backing file again" : "");
        if (repair) {
            AddCowHeader h = s->header;

            h.autoclear_features &= ~ADD_COW_AUTOCLEAR_ALL_ALLOCATED;
            ret = add_cow_write_header(bs, &h);
            if (ret < 0) {
                fprintf(stderr, "ERROR cannot write the header: %s\n",
                        strerror(-ret));
                result->check_errors++;
                goto out;
            }
            s->header = h;
            result->corruptions_fixed++;
        } else {
            result->corruptions++;
        }
    }

    /* Reads trust the flag while it is set */
    alloc_end = add_cow_all_allocated(s) ? s->header.virtual_size :
                MIN(sc.alloc_end << s->header.cluster_bits,
                    s->header.virtual_size);
    image_len = s->image ? bdrv_co_getlength(s->image->bs) : INT64_MAX;
    if (image_len < 0) {
        ret = image_len;
        fprintf(stderr, "ERROR cannot get the image file length: %s\n",
                strerror(-ret));
        result->check_errors++;
        goto out;
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
    } else if (image_len < s->header.virtual_size) {
        fprintf(stderr, "%s image file is %" PRId64 " bytes long, shorter "
                "than the virtual size (%" PRIu64 ")%s\n",
                repair ? "Repairing" : "Warning:", image_len,
                s->header.virtual_size,
                repair ? ": extending it" : "; no allocated cluster lies "
                "past its end");
    }
    if (image_len < s->header.virtual_size && repair) {
        ret = bdrv_co_truncate(s->image, s->header.virtual_size, false,
                               PREALLOC_MODE_OFF, 0, NULL);
        if (ret == 0) {
            ret = bdrv_co_flush(s->image->bs);
        }
        if (ret < 0) {
            fprintf(stderr, "ERROR cannot extend the image file: %s\n",
                    strerror(-ret));
            result->check_errors++;
            goto out;
        }
        if (image_len < alloc_end) {
            result->corruptions_fixed++;
        }
    } else if (image_len < alloc_end) {
        result->corruptions++;
    }

    result->bfi.total_clusters = s->nb_clusters;
    result->bfi.allocated_clusters = add_cow_all_allocated(s) ?
                                     s->nb_clusters : sc.allocated;
    result->image_end_offset = s->header.bitmap_offset +
                               s->header.bitmap_size;
    ret = 0;

out:
    qemu_co_mutex_unlock(&s->lock);
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

/* Create: write header and a zeroed bitmap to @blk */
static int coroutine_fn GRAPH_UNLOCKED
add_cow_write_new_header(BlockBackend *blk, uint64_t size, int cluster_bits,
                         const char *image_name, const char *image_fmt,
                         const char *backing, const char *backing_fmt,
                         Error **errp)
{
    uint64_t nb_clusters = DIV_ROUND_UP(size, 1ULL << cluster_bits);
    g_autofree uint8_t *buf = g_malloc0(ADD_COW_DEFAULT_HEADER_SIZE);
    size_t image_len = strlen(image_name);
    size_t backing_len = backing ? strlen(backing) : 0;
    AddCowHeader h = {
        .magic = ADD_COW_MAGIC,
        .header_size = ADD_COW_DEFAULT_HEADER_SIZE,
        .cluster_bits = cluster_bits,
        .virtual_size = size,
        .bitmap_offset = ADD_COW_DEFAULT_HEADER_SIZE,
        .bitmap_size = add_cow_bitmap_size(nb_clusters),
        .image_name_offset = ADD_COW_NAME_AREA_START,
        .image_name_size = image_len,
    };
    int ret;

    pstrcpy(h.image_format, sizeof(h.image_format), image_fmt);
    memcpy(buf + h.image_name_offset, image_name, image_len);
    if (backing) {
        h.backing_name_offset = h.image_name_offset + image_len;
        h.backing_name_size = backing_len;
        pstrcpy(h.backing_format, sizeof(h.backing_format), backing_fmt);
        memcpy(buf + h.backing_name_offset, backing, backing_len);
    }
    add_cow_header_cpu_to_le(&h, (AddCowHeader *)buf);

    /* Bitmap area first (zeros), header last: no valid header until done */
    ret = blk_co_truncate(blk, 0, true, PREALLOC_MODE_OFF, 0, errp);
    if (ret < 0) {
        return ret;
    }
    ret = blk_co_truncate(blk, h.bitmap_offset + h.bitmap_size, true,
                          PREALLOC_MODE_OFF, 0, errp);
    if (ret < 0) {
        return ret;
    }
    ret = blk_co_pwrite(blk, 0, h.header_size, buf, 0);
    if (ret < 0) {
        error_setg_errno(errp, -ret, "Could not write the add-cow header");
        return ret;
    }
    ret = blk_co_flush(blk);
    if (ret < 0) {
        error_setg_errno(errp, -ret, "Could not flush the add-cow file");
    }
    return ret;
}

static int coroutine_fn GRAPH_UNLOCKED
add_cow_co_create(BlockdevCreateOptions *opts, Error **errp)
{
    BlockdevCreateOptionsAddCow *ac;
    BlockDriverState *bs = NULL, *image_bs = NULL;
    BlockBackend *blk = NULL, *image_blk = NULL;
    const char *image_fmt, *backing_fmt = NULL;
    g_autofree char *image_name = NULL;
    uint64_t cluster_size, size;
    int64_t image_len;
    int ret;

    assert(opts->driver == BLOCKDEV_DRIVER_ADD_COW);
    ac = &opts->u.add_cow;

    cluster_size = ac->has_cluster_size ? ac->cluster_size :
                   ADD_COW_DEFAULT_CLUSTER_SIZE;
    if (!is_power_of_2(cluster_size) ||
        cluster_size < (1 << ADD_COW_MIN_CLUSTER_BITS) ||
        cluster_size > (1 << ADD_COW_MAX_CLUSTER_BITS)) {
        error_setg(errp, "add-cow cluster size must be a power of two "
                   "between %d and %d", 1 << ADD_COW_MIN_CLUSTER_BITS,
                   1 << ADD_COW_MAX_CLUSTER_BITS);
        return -EINVAL;
    }
    size = ac->size;
    if (!QEMU_IS_ALIGNED(size, BDRV_SECTOR_SIZE) || size > BDRV_MAX_LENGTH) {
        error_setg(errp, "add-cow image size must be a multiple of 512 and "
                   "at most %" PRId64 " bytes", (int64_t)BDRV_MAX_LENGTH);
        return -EINVAL;
    }
    image_fmt = ac->has_image_fmt ? BlockdevDriver_str(ac->image_fmt) : "raw";
    if (strcmp(image_fmt, "raw")) {
        error_setg(errp, "Unsupported add-cow image file format '%s' (only "
                   "raw is supported)", image_fmt);
        return -ENOTSUP;
    }
    if (ac->backing_file) {
        if (strlen(ac->backing_file) > ADD_COW_MAX_NAME_SIZE) {
            error_setg(errp, "Backing file name is too long (at most %d "
                       "bytes)", ADD_COW_MAX_NAME_SIZE);
            return -EINVAL;
        }
        if (!ac->has_backing_fmt) {
            error_setg(errp, "add-cow needs the backing file format "
                       "(backing-fmt)");
            return -EINVAL;
        }
        backing_fmt = BlockdevDriver_str(ac->backing_fmt);
        if (strlen(backing_fmt) >= ADD_COW_FMT_SIZE) {
            error_setg(errp, "Backing format name '%s' is too long",
                       backing_fmt);
            return -EINVAL;
        }
    } else if (ac->has_backing_fmt) {
        error_setg(errp, "backing-fmt requires backing-file");
        return -EINVAL;
    }

    image_bs = bdrv_co_open_blockdev_ref(ac->image_file, errp);
    if (!image_bs) {
        return -EIO;
    }
    image_name = g_strdup(ac->image_filename ?: image_bs->filename);
    if (!image_name[0] || strlen(image_name) > ADD_COW_MAX_NAME_SIZE) {
        error_setg(errp, "The image file needs a name of 1 to %d bytes",
                   ADD_COW_MAX_NAME_SIZE);
        ret = -EINVAL;
        goto out;
    }
    ret = add_cow_check_image_name(image_name, errp);
    if (ret < 0) {
        goto out;
    }

    image_blk = blk_co_new_with_bs(image_bs, BLK_PERM_WRITE | BLK_PERM_RESIZE,
                                   BLK_PERM_ALL, errp);
    if (!image_blk) {
        ret = -EPERM;
        goto out;
    }
    /* An existing image file is kept and never shrunk */
    image_len = blk_co_getlength(image_blk);
    if (image_len < 0) {
        ret = image_len;
        error_setg_errno(errp, -ret, "Could not get the image file size");
        goto out;
    }
    if (image_len < size) {
        ret = blk_co_truncate(image_blk, size, false, PREALLOC_MODE_OFF, 0,
                              errp);
        if (ret < 0) {
            goto out;
        }
    }
    ret = blk_co_flush(image_blk);
    if (ret < 0) {
        error_setg_errno(errp, -ret, "Could not flush the image file");
        goto out;
    }

    bs = bdrv_co_open_blockdev_ref(ac->file, errp);
    if (!bs) {
        ret = -EIO;
        goto out;
    }
    blk = blk_co_new_with_bs(bs, BLK_PERM_WRITE | BLK_PERM_RESIZE,
                             BLK_PERM_ALL, errp);
    if (!blk) {
        ret = -EPERM;
        goto out;
    }
    blk_set_allow_write_beyond_eof(blk, true);
    ret = add_cow_write_new_header(blk, size, ctz64(cluster_size),
                                   image_name, image_fmt, ac->backing_file,
                                   backing_fmt, errp);

out:
    blk_co_unref(blk);
    bdrv_co_unref(bs);
    blk_co_unref(image_blk);
    bdrv_co_unref(image_bs);
    return ret;
}

/* Length of the backing file named at create time, or -errno */
static int64_t coroutine_fn GRAPH_UNLOCKED
add_cow_backing_length(const char *filename, const char *backing,
                       const char *fmt)
{
    g_autofree char *full = NULL;
    BlockDriverState *bs;
    QDict *opts = qdict_new();
    int64_t len;

    full = bdrv_get_full_backing_filename_from_filename(filename, backing,
                                                        NULL);
    if (!full) {
        qobject_unref(opts);
        return -EINVAL;
    }
    if (fmt) {
        qdict_put_str(opts, "driver", fmt);
    }
    qdict_put_bool(opts, BDRV_OPT_FORCE_SHARE, true);
    bs = bdrv_co_open(full, NULL, opts, BDRV_O_NO_IO | BDRV_O_NO_BACKING,
                      NULL);
    if (!bs) {
        return -EIO;
    }
    bdrv_graph_co_rdlock();
    len = bdrv_co_getlength(bs);
    bdrv_graph_co_rdunlock();
    bdrv_co_unref(bs);
    return len;
}

static int coroutine_fn GRAPH_UNLOCKED
add_cow_co_create_opts(BlockDriver *drv, const char *filename,
                       QemuOpts *opts, Error **errp)
{
    BlockdevCreateOptions *create_options = NULL;
    BlockDriverState *bs = NULL, *image_bs = NULL;
    g_autofree char *image_name = NULL;
    g_autofree char *image_path = NULL;
    g_autofree char *image_fmt = NULL;
    bool image_created = false;
    QDict *qdict;
    Visitor *v;
    int ret;

    static const QDictRenames opt_renames[] = {
        { BLOCK_OPT_BACKING_FILE,       "backing-file" },
        { BLOCK_OPT_BACKING_FMT,        "backing-fmt" },
        { BLOCK_OPT_CLUSTER_SIZE,       "cluster-size" },
        { ADD_COW_OPT_IMAGE_FMT,        "image-fmt" },
        { NULL, NULL },
    };

    qdict = qemu_opts_to_qdict_filtered(opts, NULL, &add_cow_create_opts,
                                        true);
    if (!qdict_rename_keys(qdict, opt_renames, errp)) {
        ret = -EINVAL;
        goto fail;
    }

    /* The image file: as named, or next to the add-cow file by default */
    image_name = g_strdup(qdict_get_try_str(qdict, ADD_COW_OPT_IMAGE_FILE));
    qdict_del(qdict, ADD_COW_OPT_IMAGE_FILE);
    if (!image_name) {
        g_autofree char *base = g_path_get_basename(filename);

        image_name = g_strconcat(base, ".img", NULL);
    }
    ret = add_cow_check_image_name(image_name, errp);
    if (ret < 0) {
        goto fail;
    }
    image_fmt = g_strdup(qdict_get_try_str(qdict, "image-fmt") ?: "raw");
    if (strcmp(image_fmt, "raw")) {
        error_setg(errp, "Unsupported add-cow image file format '%s' (only "
                   "raw is supported)", image_fmt);
        ret = -ENOTSUP;
        goto fail;
    }

    image_path = path_combine(filename, image_name);
    if (!strcmp(image_path, filename)) {
        error_setg(errp, "The image file cannot be the add-cow file itself");
        ret = -EINVAL;
        goto fail;
    }

    ret = bdrv_co_create_file(filename, opts, true, errp);
    if (ret < 0) {
        goto fail;
    }
    bs = bdrv_co_open(filename, NULL, NULL,
                      BDRV_O_RDWR | BDRV_O_RESIZE | BDRV_O_PROTOCOL, errp);
    if (!bs) {
        ret = -EIO;
        goto fail;
    }

    /* Never overwrite an existing image file: it may hold the guest disk */
    if (!g_file_test(image_path, G_FILE_TEST_EXISTS)) {
        ret = bdrv_co_create_file(image_path, opts, false, errp);
        if (ret < 0) {
            goto fail;
        }
        image_created = true;
    }
    image_bs = bdrv_co_open(image_path, NULL, NULL,
                            BDRV_O_RDWR | BDRV_O_RESIZE | BDRV_O_PROTOCOL,
                            errp);
    if (!image_bs) {
        ret = -EIO;
        goto fail;
    }

    qdict_put_str(qdict, "driver", "add-cow");
    qdict_put_str(qdict, "file", bs->node_name);
    qdict_put_str(qdict, "image-file", image_bs->node_name);
    qdict_put_str(qdict, "image-filename", image_name);

    v = qobject_input_visitor_new_flat_confused(qdict, errp);
    if (!v) {
        ret = -EINVAL;
        goto fail;
    }
    visit_type_BlockdevCreateOptions(v, NULL, &create_options, errp);
    visit_free(v);
    if (!create_options) {
        ret = -EINVAL;
        goto fail;
    }

    /* Silently round up the size */
    create_options->u.add_cow.size =
        ROUND_UP(create_options->u.add_cow.size, BDRV_SECTOR_SIZE);

    /*
     * qemu-img fills in the backing file's size when no size was given.
     * In that case an existing, larger image file is the disk being
     * wrapped: use its size instead.
     */
    if (create_options->u.add_cow.backing_file) {
        int64_t image_len, backing_len;

        bdrv_graph_co_rdlock();
        image_len = bdrv_co_getlength(image_bs);
        bdrv_graph_co_rdunlock();
        backing_len = add_cow_backing_length(filename,
                                             create_options->u.add_cow.
                                             backing_file,
                                             qdict_get_try_str(qdict,
                                                               "backing-fmt"));
        if (backing_len >= 0 && image_len > 0 &&
            create_options->u.add_cow.size == ROUND_UP(backing_len,
                                                       BDRV_SECTOR_SIZE) &&
            image_len > backing_len) {
            create_options->u.add_cow.size = ROUND_UP(image_len,
                                                      BDRV_SECTOR_SIZE);
        }
    }

    ret = add_cow_co_create(create_options, errp);

fail:
    if (ret < 0) {
        if (bs) {
            bdrv_co_delete_file_noerr(bs);
        }
        if (image_created && image_bs) {
            bdrv_co_delete_file_noerr(image_bs);
        }
    }
    qobject_unref(qdict);
    bdrv_co_unref(bs);
    bdrv_co_unref(image_bs);
    qapi_free_BlockdevCreateOptions(create_options);
    return ret;
}

static QemuOptsList add_cow_create_opts = {
    .name = "add-cow-create-opts",
    .head = QTAILQ_HEAD_INITIALIZER(add_cow_create_opts.head),
    .desc = {
        {
            .name = BLOCK_OPT_SIZE,
            .type = QEMU_OPT_SIZE,
            .help = "Virtual disk size"
        },
        {
            .name = BLOCK_OPT_BACKING_FILE,
            .type = QEMU_OPT_STRING,
            .help = "File name of a base image"
        },
        {
            .name = BLOCK_OPT_BACKING_FMT,
            .type = QEMU_OPT_STRING,
            .help = "Image format of the base image"
        },
        {
            .name = ADD_COW_OPT_IMAGE_FILE,
            .type = QEMU_OPT_STRING,
            .help = "File holding the guest data (default: the add-cow "
                    "file name plus .img); kept if it exists"
        },
        {
            .name = ADD_COW_OPT_IMAGE_FMT,
            .type = QEMU_OPT_STRING,
            .help = "Format of the image file (default: raw)"
        },
        {
            .name = BLOCK_OPT_CLUSTER_SIZE,
            .type = QEMU_OPT_SIZE,
            .help = "Cluster size (in bytes), one bitmap bit each",
            .def_value_str = stringify(ADD_COW_DEFAULT_CLUSTER_SIZE)
        },
        { /* end of list */ }
    }
};

/*
 * qemu-img measure.  An add-cow disk is two files: the .add-cow file
 * (header and bitmap, its size known exactly) and the image file (guest
 * data at guest offsets, so at most the virtual size, and for a converted
 * image the clusters that hold data).  Both numbers are the sum of the two
 * files: "required" counts the .add-cow file plus the clusters of @in_bs
 * that hold data (everything if a backing file is named, as qcow2 does),
 * "fully allocated" the .add-cow file plus the whole virtual size.
 */
static BlockMeasureInfo *add_cow_measure(QemuOpts *opts,
                                         BlockDriverState *in_bs,
                                         Error **errp)
{
    BlockMeasureInfo *info;
    uint64_t cluster_size, virtual_size, nb_clusters, meta, required = 0;
    bool has_backing;
    g_autofree char *prealloc_str = NULL;

    cluster_size = qemu_opt_get_size_del(opts, BLOCK_OPT_CLUSTER_SIZE,
                                         ADD_COW_DEFAULT_CLUSTER_SIZE);
    if (!is_power_of_2(cluster_size) ||
        cluster_size < (1 << ADD_COW_MIN_CLUSTER_BITS) ||
        cluster_size > (1 << ADD_COW_MAX_CLUSTER_BITS)) {
        error_setg(errp, "add-cow cluster size must be a power of two "
                   "between %d and %d", 1 << ADD_COW_MIN_CLUSTER_BITS,
                   1 << ADD_COW_MAX_CLUSTER_BITS);
        return NULL;
    }
    has_backing = qemu_opt_get(opts, BLOCK_OPT_BACKING_FILE) != NULL;
    virtual_size = qemu_opt_get_size_del(opts, BLOCK_OPT_SIZE, 0);

    if (in_bs) {
        int64_t ssize = bdrv_getlength(in_bs);
        int64_t offset, pnum = 0;

        if (ssize < 0) {
            error_setg_errno(errp, -ssize, "Unable to get image virtual_size");
            return NULL;
        }
        virtual_size = ssize;
        if (has_backing) {
            /* The backing file may share nothing with the input */
            required = ROUND_UP(virtual_size, cluster_size);
        }
        for (offset = 0; !has_backing && offset < ssize; offset += pnum) {
            int ret = bdrv_block_status_above(in_bs, NULL, offset,
                                              ssize - offset, &pnum, NULL,
                                              NULL);

            if (ret < 0) {
                error_setg_errno(errp, -ret, "Unable to get block status");
                return NULL;
            }
            if (ret & BDRV_BLOCK_ZERO) {
                /* A new image without backing file reads zeros */
            } else if ((ret & (BDRV_BLOCK_DATA | BDRV_BLOCK_ALLOCATED)) ==
                       (BDRV_BLOCK_DATA | BDRV_BLOCK_ALLOCATED)) {
                /* Whole clusters: an allocating write fills the rest */
                pnum = ROUND_UP(offset + pnum, cluster_size) - offset;
                required += offset % cluster_size + pnum;
            }
        }
        required = MIN(required, ROUND_UP(virtual_size, BDRV_SECTOR_SIZE));
    }
    virtual_size = ROUND_UP(virtual_size, BDRV_SECTOR_SIZE);
    if (virtual_size > BDRV_MAX_LENGTH) {
        error_setg(errp, "add-cow image size must be at most %" PRId64
                   " bytes", (int64_t)BDRV_MAX_LENGTH);
        return NULL;
    }

    /* Preallocation of the image file (resize passes it on) */
    prealloc_str = qemu_opt_get_del(opts, BLOCK_OPT_PREALLOC);
    if (prealloc_str && (!strcmp(prealloc_str, "full") ||
                         !strcmp(prealloc_str, "falloc"))) {
        required = virtual_size;
    }

    nb_clusters = DIV_ROUND_UP(virtual_size, cluster_size);
    meta = ADD_COW_DEFAULT_HEADER_SIZE + add_cow_bitmap_size(nb_clusters);

    info = g_new0(BlockMeasureInfo, 1);
    info->required = meta + required;
    info->fully_allocated = meta + virtual_size;
    return info;
}

/* Open @filename as @fmt read-only, to check that a name is usable */
static int GRAPH_RDLOCK
add_cow_try_open(const char *filename, const char *fmt, int64_t *len,
                 Error **errp)
{
    BlockDriverState *tbs;
    QDict *opts = qdict_new();

    qdict_put_str(opts, "driver", fmt);
    tbs = bdrv_open(filename, NULL, opts, BDRV_O_NO_BACKING, errp);
    if (!tbs) {
        return -EINVAL;
    }
    if (len) {
        *len = bdrv_getlength(tbs);
    }
    bdrv_unref(tbs);
    return 0;
}

/* Resolve @name like the header's names: relative to the .add-cow file */
static char * GRAPH_RDLOCK
add_cow_resolve(BlockDriverState *bs, const char *name, Error **errp)
{
    g_autofree char *dir = NULL;

    if (path_is_absolute(name) || path_has_protocol(name)) {
        return g_strdup(name);
    }
    dir = bdrv_dirname(bs->file->bs, errp);
    if (!dir) {
        return NULL;
    }
    return g_strconcat(dir, name, NULL);
}

/*
 * qemu-img amend.  What may change is what the spec lets a writer change
 * without touching guest data:
 *  - backing_fmt: the format of the (existing) backing file;
 *  - image_file: the name of the image file, which must exist already,
 *    open as raw, and cover the virtual size (the guest data is not moved:
 *    the user copied or renamed the file); image_fmt only accepts raw,
 *    the one format QEMU opens from a header.
 * The cluster size (the bitmap's geometry) cannot change; the size changes
 * with qemu-img resize and the backing file with qemu-img rebase.
 *
 * A new name is written like rebase does (see
 * add_cow_co_change_backing_file()): into unused bytes of the name area,
 * flushed, then sector 0 rewritten in one write.  The change applies to
 * the next open; the running node keeps the image file it has open.
 */
static int GRAPH_RDLOCK
add_cow_amend_options(BlockDriverState *bs, QemuOpts *opts,
                      BlockDriverAmendStatusCB *status_cb, void *cb_opaque,
                      bool force, Error **errp)
{
    BDRVAddCowState *s = bs->opaque;
    const char *backing_fmt = qemu_opt_get(opts, BLOCK_OPT_BACKING_FMT);
    const char *image_file = qemu_opt_get(opts, ADD_COW_OPT_IMAGE_FILE);
    const char *image_fmt = qemu_opt_get(opts, ADD_COW_OPT_IMAGE_FMT);
    AddCowHeader h = s->header;
    g_autofree char *path = NULL;
    uint32_t pos = 0;
    int64_t len;
    int ret;

    if (qemu_opt_get(opts, BLOCK_OPT_CLUSTER_SIZE)) {
        error_setg(errp, "Changing the cluster size of an add-cow image is "
                   "not supported (the bitmap has one bit per cluster); use "
                   "qemu-img convert");
        return -ENOTSUP;
    }
    if (qemu_opt_get(opts, BLOCK_OPT_SIZE)) {
        error_setg(errp, "Use qemu-img resize to change the size of an "
                   "add-cow image");
        return -ENOTSUP;
    }
    if (qemu_opt_get(opts, BLOCK_OPT_BACKING_FILE)) {
        error_setg(errp, "Use qemu-img rebase to change the backing file of "
                   "an add-cow image");
        return -ENOTSUP;
    }

    if (backing_fmt) {
        if (!h.backing_name_size) {
            error_setg(errp, "The image has no backing file, so it has no "
                       "backing format to change");
            return -EINVAL;
        }
        if (!backing_fmt[0] || strlen(backing_fmt) >= ADD_COW_FMT_SIZE ||
            !bdrv_find_format(backing_fmt)) {
            error_setg(errp, "Unknown or invalid backing format '%s'",
                       backing_fmt);
            return -EINVAL;
        }
        path = add_cow_resolve(bs, bs->backing_file, errp);
        if (!path) {
            return -EINVAL;
        }
        ret = add_cow_try_open(path, backing_fmt, NULL, errp);
        if (ret < 0 && !force) {
            error_prepend(errp, "The backing file does not open as %s "
                          "(use --force to store it anyway): ", backing_fmt);
            return ret;
        } else if (ret < 0) {
            error_free(*errp);
            *errp = NULL;
        }
        g_free(path);
        path = NULL;
        memset(h.backing_format, 0, sizeof(h.backing_format));
        pstrcpy(h.backing_format, sizeof(h.backing_format), backing_fmt);
    }

    if (image_file || image_fmt) {
        const char *name = image_file ?: s->image_name;
        const char *fmt = image_fmt ?: s->header.image_format;

        if (!name[0] || strlen(name) > ADD_COW_MAX_NAME_SIZE) {
            error_setg(errp, "The image file needs a name of 1 to %d bytes",
                       ADD_COW_MAX_NAME_SIZE);
            return -EINVAL;
        }
        ret = add_cow_check_image_name(name, errp);
        if (ret < 0) {
            return ret;
        }
        if (strcmp(fmt, "raw")) {
            /* See add_cow_do_open(): no format recursion from a header */
            error_setg(errp, "Unsupported image file format '%s' (only raw "
                       "is supported)", fmt);
            return -ENOTSUP;
        }
        path = add_cow_resolve(bs, name, errp);
        if (!path) {
            return -EINVAL;
        }
        if (!strcmp(path, bs->file->bs->filename)) {
            error_setg(errp, "The image file cannot be the add-cow file "
                       "itself");
            return -EINVAL;
        }
        /* The guest data must already be there: never create it here */
        ret = image_file ? add_cow_try_open(path, fmt, &len, errp) : 0;
        if (ret < 0) {
            error_prepend(errp, "The new image file must exist and open as "
                          "%s: ", fmt);
            return ret;
        }
        if (image_file && len < (int64_t)s->header.virtual_size && !force) {
            error_setg(errp, "The new image file is %" PRId64 " bytes long, "
                       "shorter than the virtual size %" PRIu64 " (use "
                       "--force to accept that)", len,
                       s->header.virtual_size);
            return -EINVAL;
        }
        memset(h.image_format, 0, sizeof(h.image_format));
        pstrcpy(h.image_format, sizeof(h.image_format), fmt);

        if (image_file && strcmp(image_file, s->image_name)) {
            size_t nlen = strlen(image_file);

            pos = add_cow_find_name_space(s, nlen);
            if (!pos) {
                error_setg(errp, "No space left in the add-cow header for "
                           "the new image file name");
                return -ENOSPC;
            }
            /* New name first, stable before sector 0 points at it */
            ret = bdrv_pwrite(bs->file, pos, nlen, image_file, 0);
            if (ret == 0) {
                ret = bdrv_flush(bs->file->bs);
            }
            if (ret < 0) {
                error_setg_errno(errp, -ret, "Could not write the image "
                                 "file name");
                return ret;
            }
            h.image_name_offset = pos;
            h.image_name_size = nlen;
        }
    }

    if (!memcmp(&h, &s->header, sizeof(h))) {
        return 0;
    }
    ret = add_cow_write_header(bs, &h);
    if (ret < 0) {
        error_setg_errno(errp, -ret, "Could not write the add-cow header");
        return ret;
    }
    s->header = h;
    if (pos) {
        g_free(s->image_name);
        s->image_name = g_strdup(image_file);
    }
    pstrcpy(bs->backing_format, sizeof(bs->backing_format),
            s->header.backing_format);
    if (status_cb) {
        status_cb(bs, 1, 1, cb_opaque);
    }
    return 0;
}

static QemuOptsList add_cow_amend_opts = {
    .name = "add-cow-amend-opts",
    .head = QTAILQ_HEAD_INITIALIZER(add_cow_amend_opts.head),
    .desc = {
        {
            .name = BLOCK_OPT_BACKING_FMT,
            .type = QEMU_OPT_STRING,
            .help = "Format of the backing file (the name stays)"
        },
        {
            .name = ADD_COW_OPT_IMAGE_FILE,
            .type = QEMU_OPT_STRING,
            .help = "Name of an existing file that holds the guest data"
        },
        {
            .name = ADD_COW_OPT_IMAGE_FMT,
            .type = QEMU_OPT_STRING,
            .help = "Format of the image file"
        },
        {
            .name = BLOCK_OPT_CLUSTER_SIZE,
            .type = QEMU_OPT_SIZE,
            .help = "Cannot be changed (refused with an error)"
        },
        {
            .name = BLOCK_OPT_SIZE,
            .type = QEMU_OPT_SIZE,
            .help = "Use qemu-img resize (refused with an error)"
        },
        {
            .name = BLOCK_OPT_BACKING_FILE,
            .type = QEMU_OPT_STRING,
            .help = "Use qemu-img rebase (refused with an error)"
        },
        { /* end of list */ }
    }
};

static const char *const add_cow_strong_runtime_opts[] = {
    "image-file",
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
