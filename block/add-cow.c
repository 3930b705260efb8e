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

/*
 * Unallocated clusters may read non-zero data: a backing file is attached,
 * or the header names one (a node opened with "backing": null must not
 * make zero writes that the next normal open would not see).
 */
static bool add_cow_has_backing(BlockDriverState *bs)
{
    BDRVAddCowState *s = bs->opaque;

    return bs->backing || s->header.backing_name_size;
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

/*
 * Write @h and make it the in-memory header.  A failed write may or may not
 * have reached the disk: the names of @h stay reserved until a header write
 * succeeds (see add_cow_find_name_space()), and the caller keeps its
 * in-memory state, which describes the old header, consistent.
 */
static int coroutine_mixed_fn GRAPH_RDLOCK
add_cow_update_header(BlockDriverState *bs, const AddCowHeader *h)
{
    BDRVAddCowState *s = bs->opaque;
    int ret = add_cow_write_header(bs, h);

    if (ret < 0) {
        s->unsure_header = *h;
        s->header_unsure = true;
        return ret;
    }
    s->header = *h;
    s->header_unsure = false;
    return 0;
}

/*
 * Unknown autoclear bits describe state this writer would not maintain:
 * they are cleared before anything is written.  A read-write open does it
 * at once; a node opened read-only and reopened read-write (commit, stream)
 * does it here, at its first write.  Caller holds s->lock, or has the node
 * to itself (open, drained).
 */
static int coroutine_mixed_fn GRAPH_RDLOCK
add_cow_clear_unknown_autoclear(BlockDriverState *bs)
{
    BDRVAddCowState *s = bs->opaque;
    AddCowHeader h = s->header;

    if (likely(!(h.autoclear_features & ~ADD_COW_AUTOCLEAR_MASK))) {
        return 0;
    }
    h.autoclear_features &= ADD_COW_AUTOCLEAR_MASK;
    return add_cow_update_header(bs, &h);
}

/*
 * The path of the header name @name for an add-cow file at @base: names are
 * plain file names, relative ones resolved against the add-cow file's
 * directory.  A relative result starts with "./", so that nothing in the
 * block layer takes a colon in it for a protocol prefix.
 */
static char *add_cow_name_path(const char *base, const char *name)
{
    g_autofree char *dir = NULL;

    if (path_is_absolute(name)) {
        return g_strdup(name);
    }
    dir = g_path_get_dirname(base);
    return g_build_filename(dir, name, NULL);
}

/* The local file below @bs, seen through raw format nodes, or NULL */
static BlockDriverState *add_cow_local_file(BlockDriverState *bs)
{
    while (bs && bs->drv && !strcmp(bs->drv->format_name, "raw") &&
           bs->file) {
        bs = bs->file->bs;
    }
    if (!bs || !bs->drv || strcmp(bs->drv->format_name, "file")) {
        return NULL;
    }
    return bs;
}

/*
 * Are @a and @b the same node or the same local file (device and inode)?
 * Writing guest data into the .add-cow file would destroy the header.
 */
static bool add_cow_same_file(BlockDriverState *a, BlockDriverState *b)
{
    BlockDriverState *fa = add_cow_local_file(a);
    BlockDriverState *fb = add_cow_local_file(b);
    struct stat sa, sb;

    if (a == b || (fa && fa == fb)) {
        return true;
    }
    if (!fa || !fb || stat(fa->filename, &sa) < 0 ||
        stat(fb->filename, &sb) < 0) {
        return false;
    }
    return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

/* Is @path the local file behind @bs (same device and inode)? */
static bool add_cow_is_local_path(BlockDriverState *bs, const char *path)
{
    BlockDriverState *local = add_cow_local_file(bs);
    struct stat a, b;

    return local && stat(local->filename, &a) == 0 && stat(path, &b) == 0 &&
           a.st_dev == b.st_dev && a.st_ino == b.st_ino;
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

/* Read and validate the fixed header into s->header */
static int coroutine_fn GRAPH_RDLOCK
add_cow_read_header(BlockDriverState *bs, Error **errp)
{
    BDRVAddCowState *s = bs->opaque;
    AddCowHeader le;
    int64_t file_size;
    int ret;

    file_size = bdrv_co_getlength(bs->file->bs);
    if (file_size < 0) {
        error_setg_errno(errp, -file_size, "Could not get the add-cow file "
                         "size");
        return file_size;
    }
    if (file_size < sizeof(le)) {
        error_setg(errp, "add-cow file is truncated: %" PRId64 " bytes is "
                   "shorter than the header", file_size);
        return -EINVAL;
    }
    ret = bdrv_co_pread(bs->file, 0, sizeof(le), &le, 0);
    if (ret < 0) {
        error_setg_errno(errp, -ret, "Could not read the add-cow header");
        return ret;
    }
    add_cow_header_le_to_cpu(&le, &s->header);
    ret = add_cow_validate_header(&s->header, file_size, errp);
    if (ret < 0) {
        return ret;
    }
    add_cow_set_geometry(s);
    return 0;
}

/* Read the names the header points to; the backing name goes to @bs */
static int coroutine_fn GRAPH_RDLOCK
add_cow_read_names(BlockDriverState *bs, Error **errp)
{
    BDRVAddCowState *s = bs->opaque;
    g_autofree char *backing = NULL;
    int ret;

    ret = add_cow_read_name(bs, "image file", s->header.image_name_offset,
                            s->header.image_name_size, &s->image_name, errp);
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
    return 0;
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
        if (ret == 0) {
            ret = add_cow_check_image(bs, errp);
        }
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
    QLIST_INIT(&s->inflight);
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
    if (local.niov <= IOV_MAX) {
        ret = bdrv_co_pwritev(s->image, cow_start, local.size, &local, 0);
    } else {
        /*
         * The guest request alone may use up to IOV_MAX entries: write the
         * fill areas and the guest data separately (as qcow2 does when it
         * cannot merge them).  All of it precedes the bits anyway.
         */
        ret = bdrv_co_pwritev_part(s->image, offset, bytes, qiov,
                                   qiov_offset, 0);
        if (ret == 0 && head) {
            ret = bdrv_co_pwrite(s->image, cow_start, head, head_buf, 0);
        }
        if (ret == 0 && tail) {
            ret = bdrv_co_pwrite(s->image, offset + bytes, tail,
                                 tail_buf ?: (uint8_t *)head_buf + head +
                                 bytes, 0);
        }
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

    return add_cow_cache_set(s->cache, first, last - first + 1, true);
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
    ret = add_cow_clear_unknown_autoclear(bs);
    if (ret < 0) {
        qemu_co_mutex_unlock(&s->lock);
        return ret;
    }
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
            if (ret == 0) {
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
    BlockReq req;
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
    reqlist_wait_all(&s->inflight, offset, bytes, &s->lock);
    reqlist_init_req(&s->inflight, &req, offset, bytes);
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
 * Where the image file is: its node, or, when it is not open (qemu-img
 * info opens images with BDRV_O_NO_IO, and must not open files that an
 * untrusted header names), the path the header's name resolves to.
 */
static char * GRAPH_RDLOCK add_cow_header_image_path(BlockDriverState *bs)
{
    BDRVAddCowState *s = bs->opaque;
    g_autofree char *dir = NULL;

    if (path_is_absolute(s->image_name)) {
        return g_strdup(s->image_name);
    }
    dir = bdrv_dirname(bs->file->bs, NULL);
    return dir ? g_strconcat(dir, s->image_name, NULL) : NULL;
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

/* Does [@pos, @pos + @size) overlap a name that @h points to? */
static uint32_t add_cow_name_conflict(const AddCowHeader *h, uint32_t pos,
                                      uint32_t size)
{
    if (ranges_overlap(pos, size, h->image_name_offset, h->image_name_size)) {
        return h->image_name_offset + h->image_name_size;
    }
    if (h->backing_name_size &&
        ranges_overlap(pos, size, h->backing_name_offset,
                       h->backing_name_size)) {
        return h->backing_name_offset + h->backing_name_size;
    }
    return 0;
}

/*
 * Find @size free bytes in the name area that overlap no name the header on
 * disk may point to, so a name can be replaced without ever making the
 * header point at a torn one.  After a failed header write the disk may
 * hold either header, so the names of both are kept.
 */
static uint32_t add_cow_find_name_space(BDRVAddCowState *s, uint32_t size)
{
    uint32_t pos = ADD_COW_NAME_AREA_START;
    uint32_t next;

    while (pos + size <= s->header.header_size) {
        next = add_cow_name_conflict(&s->header, pos, size);
        if (!next && s->header_unsure) {
            next = add_cow_name_conflict(&s->unsure_header, pos, size);
        }
        if (!next) {
            return pos;
        }
        pos = next;
    }
    return 0;
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
    return bdrv_co_flush(bs->file->bs);
}

/*
 * Store @name as the image file name (@backing false) or the backing file
 * name (@backing true, NULL to drop it) of header @h, in free bytes of
 * the name area (add_cow_find_name_space()), flushed, so that the sector-0
 * write of @h that the caller makes next points at a stable name.
 */
static int coroutine_mixed_fn GRAPH_RDLOCK
add_cow_write_name(BlockDriverState *bs, AddCowHeader *h, bool backing,
                   const char *name)
{
    BDRVAddCowState *s = bs->opaque;
    size_t len = name ? strlen(name) : 0;
    uint32_t pos = 0;
    int ret;

    if (len > ADD_COW_MAX_NAME_SIZE) {
        return -ENAMETOOLONG;
    }
    if (len) {
        pos = add_cow_find_name_space(s, len);
        if (!pos) {
            return -ENOSPC;
        }
        ret = bdrv_pwrite(bs->file, pos, len, name, 0);
        if (ret == 0) {
            ret = bdrv_flush(bs->file->bs);
        }
        if (ret < 0) {
            return ret;
        }
    }
    if (backing) {
        h->backing_name_offset = pos;
        h->backing_name_size = len;
    } else {
        h->image_name_offset = pos;
        h->image_name_size = len;
    }
    return 0;
}

/* Would the backing file name @name make @bs its own backing file? */
static bool GRAPH_RDLOCK
add_cow_names_itself(BlockDriverState *bs, const char *name)
{
    BlockDriverState *local = add_cow_local_file(bs->file->bs);
    g_autofree char *path = NULL;
    struct stat sa, sb;

    if (!local || strstart(name, "json:", NULL) || path_has_protocol(name)) {
        return false;
    }
    path = bdrv_get_full_backing_filename_from_filename(local->filename,
                                                        name, NULL);
    return path && stat(path, &sa) == 0 && stat(local->filename, &sb) == 0 &&
           sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
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
 * Write order, and why a crash cannot leave an unusable header:
 *
 *  0. Every allocation made so far (e.g. the clusters a safe rebase just
 *     copied) is made stable, bits included, before the header names
 *     another backing file; otherwise a crash would let those clusters
 *     read the new backing file's data.
 *  1. The new name is written into bytes of the name area that no name of
 *     the header on disk uses, and the .add-cow file is flushed
 *     (add_cow_write_name()).  A crash during or after this step leaves the
 *     old header with both old names intact.
 *  2. Only then is sector 0 (which holds the name offsets and sizes and the
 *     backing format) rewritten with one sector-sized write and flushed:
 *     after a crash it is either the old one or the new one, which points
 *     at a name that step 1 made stable.
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
    if (ret == 0) {
        ret = add_cow_write_name(bs, &h, true, backing_file);
    }
    if (ret < 0) {
        goto out;
    }
    memset(h.backing_format, 0, sizeof(h.backing_format));
    if (backing_file) {
        pstrcpy(h.backing_format, sizeof(h.backing_format), backing_fmt);
    }
    ret = add_cow_update_header(bs, &h);

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

    /* (1) stale bytes in the allocated partial last cluster */
    if (!QEMU_IS_ALIGNED(old_size, s->cluster_size)) {
        int64_t zend = MIN(MIN(ROUND_UP(old_size, s->cluster_size), offset),
                           image_len);
        bool allocated;
        int64_t n = add_cow_find_run(s, old_size - 1, 1, &allocated);

        ret = n < 0 ? n : 0;
        if (ret == 0 && allocated && zend > old_size) {
            ret = bdrv_co_pwrite_zeroes(s->image, old_size, zend - old_size,
                                        0);
        }
        if (ret < 0) {
            error_setg_errno(errp, -ret, "Could not clear the image file past "
                             "the old end");
            return ret;
        }
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
    ret = add_cow_clear_bits_from(bs, nb_clusters, old_bitmap_size);
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
    reqlist_wait_all(&s->inflight, wait_start,
                     ROUND_UP(MAX(offset, old_size), s->cluster_size) -
                     wait_start, &s->lock);

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
    ret = bdrv_pwrite_zeroes(bs->file, s->header.bitmap_offset,
                             s->header.bitmap_size, 0);
    add_cow_cache_clear_all(s->cache);
    if (ret < 0) {
        return ret;
    }
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
 * qemu-img check.  The header was validated by open (an image that breaks a
 * field rule does not open at all), and open also found the image file and
 * the backing file, so what is left are the conditions a reader tolerates:
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
    ret = add_cow_clear_bits_from(bs, s->nb_clusters, s->header.bitmap_size);
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

static int coroutine_fn GRAPH_RDLOCK
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
    ret = add_cow_scan_bitmap(bs, &sc);
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

/*
 * Grow the image file behind @blk to @size.  A file system that cannot
 * hold a file that large (EFBIG) gets a message naming the image file and
 * the largest length it accepts (found by trying lengths, which costs no
 * data blocks); the generic "image size is too large" message would blame
 * the cluster size.
 */
static int coroutine_fn GRAPH_UNLOCKED
add_cow_extend_image(BlockBackend *blk, const char *name, int64_t len,
                     uint64_t size, PreallocMode prealloc, Error **errp)
{
    Error *local_err = NULL;
    int64_t lo = len, hi = size, mid;
    int ret;

    ret = blk_co_truncate(blk, size, false, prealloc, 0, &local_err);
    if (ret != -EFBIG) {
        error_propagate(errp, local_err);
        return ret;
    }
    error_free(local_err);
    while (hi - lo > BDRV_SECTOR_SIZE) {
        mid = QEMU_ALIGN_DOWN(lo + (hi - lo) / 2, BDRV_SECTOR_SIZE);
        if (blk_co_truncate(blk, mid, false, PREALLOC_MODE_OFF, 0,
                            NULL) == 0) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    blk_co_truncate(blk, len, false, PREALLOC_MODE_OFF, 0, NULL);
    error_setg(errp, "The image file '%s' cannot grow to %" PRIu64 " bytes: "
               "its file system's largest file is %" PRId64 " bytes; put the "
               "image file on another file system (-o image_file=PATH)",
               name, size, lo);
    return -EINVAL;
}

/* Create a new, empty local file at @path (never an existing one) */
static int coroutine_fn GRAPH_UNLOCKED
add_cow_create_local(const char *path, Error **errp)
{
    BlockDriver *drv = bdrv_find_protocol(path, false, errp);
    QemuOpts *opts;
    int ret;

    if (!drv) {
        return -ENOENT;
    }
    opts = qemu_opts_create(drv->create_opts, NULL, 0, &error_abort);
    qemu_opt_set_number(opts, BLOCK_OPT_SIZE, 0, &error_abort);
    ret = bdrv_co_create(drv, path, opts, errp);
    qemu_opts_del(opts);
    return ret;
}

/* Open the local file @path as a protocol node, never parsing its name */
static BlockDriverState * coroutine_fn GRAPH_UNLOCKED
add_cow_open_local(const char *path, Error **errp)
{
    QDict *opts = qdict_new();

    qdict_put_str(opts, "driver", "file");
    qdict_put_str(opts, "filename", path);
    return bdrv_co_open(NULL, NULL, opts, BDRV_O_RDWR | BDRV_O_RESIZE, errp);
}

/*
 * Find the image file of a new image whose .add-cow file is @bs, when no
 * image-file node was given: @image_filename, or the .add-cow file's name
 * plus ".img".  A named file is used as it is if it exists; the derived
 * name must not exist, since it may hold another disk's data (e.g. the
 * image file of an image that was renamed).  *@created says whether the
 * file was created here.
 */
static BlockDriverState * coroutine_fn GRAPH_UNLOCKED
add_cow_default_image(BlockDriverState *bs, const char *image_filename,
                      char **name, bool *created, Error **errp)
{
    BlockDriverState *local = add_cow_local_file(bs);
    g_autofree char *path = NULL;
    BlockDriverState *image_bs;

    if (!local) {
        error_setg(errp, "add-cow needs an image file node (image-file) "
                   "when the add-cow file is not a local file");
        return NULL;
    }
    if (image_filename) {
        *name = g_strdup(image_filename);
    } else {
        g_autofree char *base = g_path_get_basename(local->filename);

        *name = g_strconcat(base, ".img", NULL);
    }
    path = add_cow_name_path(local->filename, *name);
    if (g_file_test(path, G_FILE_TEST_EXISTS)) {
        if (!image_filename) {
            error_setg(errp, "The image file '%s' already exists and may "
                       "hold another disk's data; to make it the image "
                       "file of this image, name it (qemu-img create -o "
                       "image_file=%s, or image-filename in blockdev-create)",
                       path, *name);
            return NULL;
        }
    } else {
        if (add_cow_create_local(path, errp) < 0) {
            return NULL;
        }
        *created = true;
    }
    image_bs = add_cow_open_local(path, errp);
    if (!image_bs && *created) {
        unlink(path);
        *created = false;
    }
    return image_bs;
}

/*
 * The name to store for an image file node given to blockdev-create: the
 * node's file name, made relative to the .add-cow file's directory when
 * the image file lies in it (the header's names are resolved against that
 * directory), else absolute.
 */
static char *add_cow_node_name_for(BlockDriverState *bs,
                                   BlockDriverState *image_bs)
{
    BlockDriverState *local = add_cow_local_file(bs);
    g_autofree char *ipath = g_canonicalize_filename(image_bs->filename,
                                                     NULL);
    g_autofree char *bpath = NULL;
    g_autofree char *idir = g_path_get_dirname(ipath);
    g_autofree char *bdir = NULL;

    if (!local) {
        return g_steal_pointer(&ipath);
    }
    bpath = g_canonicalize_filename(local->filename, NULL);
    bdir = g_path_get_dirname(bpath);
    if (!strcmp(idir, bdir)) {
        return g_path_get_basename(ipath);
    }
    return g_steal_pointer(&ipath);
}

/* Check the creation options that need no file */
static int add_cow_create_check(BlockdevCreateOptionsAddCow *ac,
                                uint64_t *cluster_size, PreallocMode *prealloc,
                                const char **backing_fmt, Error **errp)
{
    *cluster_size = ac->has_cluster_size ? ac->cluster_size :
                    ADD_COW_DEFAULT_CLUSTER_SIZE;
    if (!is_power_of_2(*cluster_size) ||
        *cluster_size < (1 << ADD_COW_MIN_CLUSTER_BITS) ||
        *cluster_size > (1 << ADD_COW_MAX_CLUSTER_BITS)) {
        error_setg(errp, "add-cow cluster size must be a power of two "
                   "between %d and %d", 1 << ADD_COW_MIN_CLUSTER_BITS,
                   1 << ADD_COW_MAX_CLUSTER_BITS);
        return -EINVAL;
    }
    if (!QEMU_IS_ALIGNED(ac->size, BDRV_SECTOR_SIZE) ||
        ac->size > BDRV_MAX_LENGTH) {
        error_setg(errp, "add-cow image size must be a multiple of 512 and "
                   "at most %" PRId64 " bytes", (int64_t)BDRV_MAX_LENGTH);
        return -EINVAL;
    }
    *prealloc = ac->has_preallocation ? ac->preallocation : PREALLOC_MODE_OFF;
    if (*prealloc == PREALLOC_MODE_METADATA) {
        error_setg(errp, "add-cow has no metadata to preallocate (use "
                   "preallocation=falloc or full for the image file)");
        return -EINVAL;
    }
    if (ac->has_image_fmt && ac->image_fmt != BLOCKDEV_DRIVER_RAW) {
        error_setg(errp, "Unsupported add-cow image file format '%s' (only "
                   "raw is supported)", BlockdevDriver_str(ac->image_fmt));
        return -ENOTSUP;
    }
    *backing_fmt = NULL;
    if (!ac->backing_file) {
        if (ac->has_backing_fmt) {
            error_setg(errp, "backing-fmt requires backing-file");
            return -EINVAL;
        }
        return 0;
    }
    if (strlen(ac->backing_file) > ADD_COW_MAX_NAME_SIZE) {
        error_setg(errp, "Backing file name is too long (at most %d bytes)",
                   ADD_COW_MAX_NAME_SIZE);
        return -EINVAL;
    }
    if (!ac->has_backing_fmt) {
        error_setg(errp, "add-cow needs the backing file format "
                   "(backing-fmt)");
        return -EINVAL;
    }
    *backing_fmt = BlockdevDriver_str(ac->backing_fmt);
    if (strlen(*backing_fmt) >= ADD_COW_FMT_SIZE) {
        error_setg(errp, "Backing format name '%s' is too long",
                   *backing_fmt);
        return -EINVAL;
    }
    return 0;
}

static int coroutine_fn GRAPH_UNLOCKED
add_cow_co_create(BlockdevCreateOptions *opts, Error **errp)
{
    BlockdevCreateOptionsAddCow *ac;
    BlockDriverState *bs = NULL, *image_bs = NULL;
    BlockBackend *blk = NULL, *image_blk = NULL;
    const char *backing_fmt;
    g_autofree char *image_name = NULL;
    PreallocMode prealloc;
    bool image_created = false;
    uint64_t cluster_size, size;
    int64_t image_len;
    int ret;

    assert(opts->driver == BLOCKDEV_DRIVER_ADD_COW);
    ac = &opts->u.add_cow;
    ret = add_cow_create_check(ac, &cluster_size, &prealloc, &backing_fmt,
                               errp);
    if (ret < 0) {
        return ret;
    }
    size = ac->size;

    bs = bdrv_co_open_blockdev_ref(ac->file, errp);
    if (!bs) {
        return -EIO;
    }
    if (ac->image_file) {
        image_bs = bdrv_co_open_blockdev_ref(ac->image_file, errp);
        image_name = ac->image_filename ? g_strdup(ac->image_filename) :
                     image_bs ? add_cow_node_name_for(bs, image_bs) : NULL;
    } else {
        image_bs = add_cow_default_image(bs, ac->image_filename, &image_name,
                                         &image_created, errp);
    }
    if (!image_bs) {
        ret = -EIO;
        goto out;
    }
    if (!image_name[0] || strlen(image_name) > ADD_COW_MAX_NAME_SIZE) {
        error_setg(errp, "The image file needs a name of 1 to %d bytes",
                   ADD_COW_MAX_NAME_SIZE);
        ret = -EINVAL;
        goto out;
    }
    if (add_cow_same_file(bs, image_bs)) {
        error_setg(errp, "The image file '%s' is the add-cow file itself",
                   image_name);
        ret = -EINVAL;
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
        error_setg_errno(errp, -ret, "Could not get the size of the image "
                         "file '%s'", image_name);
        goto out;
    }
    if (image_len < size) {
        ret = add_cow_extend_image(image_blk, image_name, image_len, size,
                                   prealloc, errp);
        if (ret < 0) {
            goto out;
        }
    } else if (prealloc != PREALLOC_MODE_OFF) {
        error_setg(errp, "The image file '%s' exists and already covers the "
                   "disk; preallocation only applies to a file that grows",
                   image_name);
        ret = -EINVAL;
        goto out;
    }
    ret = blk_co_flush(image_blk);
    if (ret < 0) {
        error_setg_errno(errp, -ret, "Could not flush the image file '%s'",
                         image_name);
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
                                   image_name, "raw", ac->backing_file,
                                   backing_fmt, errp);

out:
    blk_co_unref(blk);
    blk_co_unref(image_blk);
    if (ret < 0 && image_created) {
        bdrv_co_delete_file_noerr(image_bs);
    }
    bdrv_co_unref(bs);
    bdrv_co_unref(image_bs);
    return ret;
}

/*
 * The image file of the add-cow image that exists at @filename, if it is
 * the default image file of a new image at @filename: creating an image
 * over an existing one (drive-mirror and drive-backup do that for their
 * targets) replaces that image, its default image file included.  Any
 * other existing file of the default name may belong to another image.
 * Returns the path to replace, or NULL.
 */
static char * coroutine_fn GRAPH_UNLOCKED
add_cow_replaced_image(const char *filename)
{
    g_autofree char *derived = g_strconcat(filename, ".img", NULL);
    QDict *opts = qdict_new();
    BlockDriverState *old;
    char *path;
    struct stat a, b;

    qdict_put_str(opts, "driver", "add-cow");
    qdict_put_bool(opts, BDRV_OPT_FORCE_SHARE, true);
    /* BDRV_O_NO_IO: the header is read, the image file is not opened */
    old = bdrv_co_open(filename, NULL, opts,
                       BDRV_O_NO_IO | BDRV_O_NO_BACKING, NULL);
    if (!old) {
        return NULL;
    }
    bdrv_graph_co_rdlock();
    path = add_cow_header_image_path(old);
    bdrv_graph_co_rdunlock();
    bdrv_co_unref(old);
    if (!path || stat(path, &a) < 0 || stat(derived, &b) < 0 ||
        a.st_dev != b.st_dev || a.st_ino != b.st_ino) {
        g_free(path);
        return NULL;
    }
    return path;
}

static int coroutine_fn GRAPH_UNLOCKED
add_cow_co_create_opts(BlockDriver *drv, const char *filename,
                       QemuOpts *opts, Error **errp)
{
    BlockdevCreateOptions *create_options = NULL;
    BlockDriverState *bs = NULL;
    g_autofree char *prealloc = NULL;
    g_autofree char *replaced = NULL;
    QDict *qdict;
    Visitor *v;
    int ret;

    static const QDictRenames opt_renames[] = {
        { BLOCK_OPT_BACKING_FILE,       "backing-file" },
        { BLOCK_OPT_BACKING_FMT,        "backing-fmt" },
        { BLOCK_OPT_CLUSTER_SIZE,       "cluster-size" },
        { ADD_COW_OPT_IMAGE_FILE,       "image-filename" },
        { ADD_COW_OPT_IMAGE_FMT,        "image-fmt" },
        { NULL, NULL },
    };

    /* Preallocation is for the image file, not for the .add-cow file */
    prealloc = qemu_opt_get_del(opts, BLOCK_OPT_PREALLOC);
    qdict = qemu_opts_to_qdict_filtered(opts, NULL, &add_cow_create_opts,
                                        true);
    if (!qdict_rename_keys(qdict, opt_renames, errp)) {
        ret = -EINVAL;
        goto fail;
    }
    if (prealloc) {
        qdict_put_str(qdict, "preallocation", prealloc);
    }

    if (!qdict_haskey(qdict, "image-filename")) {
        replaced = add_cow_replaced_image(filename);
    }
    ret = bdrv_co_create_file(filename, opts, true, errp);
    if (ret < 0) {
        goto fail;
    }
    /* The image that owned it is gone now: so is its data */
    if (replaced && unlink(replaced) < 0 && errno != ENOENT) {
        error_setg_errno(errp, errno, "Could not replace the image file "
                         "'%s'", replaced);
        ret = -errno;
        goto fail;
    }
    bs = bdrv_co_open(filename, NULL, NULL,
                      BDRV_O_RDWR | BDRV_O_RESIZE | BDRV_O_PROTOCOL, errp);
    if (!bs) {
        ret = -EIO;
        goto fail;
    }

    /* The image file is found or created by add_cow_co_create() */
    qdict_put_str(qdict, "driver", "add-cow");
    qdict_put_str(qdict, "file", bs->node_name);

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

    ret = add_cow_co_create(create_options, errp);

fail:
    if (ret < 0 && bs) {
        bdrv_co_delete_file_noerr(bs);
    }
    qobject_unref(qdict);
    bdrv_co_unref(bs);
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

/* Open the backing file name @filename as @fmt, to check that it is usable */
static int GRAPH_RDLOCK
add_cow_try_open_backing(const char *filename, const char *fmt, Error **errp)
{
    BlockDriverState *tbs;
    QDict *opts = qdict_new();

    qdict_put_str(opts, "driver", fmt);
    tbs = bdrv_open(filename, NULL, opts, BDRV_O_NO_BACKING, errp);
    if (!tbs) {
        return -EINVAL;
    }
    bdrv_unref(tbs);
    return 0;
}

/*
 * Check a new image file name for @bs: the plain file @name, relative to
 * the .add-cow file's directory, must exist, open as raw, not be the
 * .add-cow file, and cover the virtual size (unless @force).
 */
static int GRAPH_RDLOCK
add_cow_check_new_image(BlockDriverState *bs, const char *name, bool force,
                        Error **errp)
{
    BDRVAddCowState *s = bs->opaque;
    g_autofree char *dir = NULL;
    g_autofree char *path = NULL;
    BlockDriverState *tbs;
    QDict *opts;
    int64_t len;

    if (!name[0] || strlen(name) > ADD_COW_MAX_NAME_SIZE) {
        error_setg(errp, "The image file needs a name of 1 to %d bytes",
                   ADD_COW_MAX_NAME_SIZE);
        return -EINVAL;
    }
    if (path_is_absolute(name)) {
        path = g_strdup(name);
    } else {
        dir = bdrv_dirname(bs->file->bs, errp);
        if (!dir) {
            return -EINVAL;
        }
        path = g_strconcat(dir, name, NULL);
    }
    /* A plain file, whatever its name looks like; guest data is not moved */
    opts = qdict_new();
    qdict_put_str(opts, "driver", "raw");
    qdict_put_str(opts, "file.driver", "file");
    qdict_put_str(opts, "file.filename", path);
    tbs = bdrv_open(NULL, NULL, opts, BDRV_O_NO_BACKING, errp);
    if (!tbs) {
        error_prepend(errp, "The new image file must exist and open as raw: ");
        return -EINVAL;
    }
    len = bdrv_getlength(tbs);
    if (add_cow_same_file(bs->file->bs, tbs)) {
        error_setg(errp, "The image file '%s' is the add-cow file itself",
                   path);
        len = -EINVAL;
    } else if (len >= 0 && len < (int64_t)s->header.virtual_size && !force) {
        error_setg(errp, "The new image file '%s' is %" PRId64 " bytes long, "
                   "shorter than the virtual size %" PRIu64 " (use --force "
                   "to accept that)", path, len, s->header.virtual_size);
        len = -EINVAL;
    } else if (len < 0) {
        error_setg_errno(errp, -len, "Could not get the length of '%s'",
                         path);
    }
    bdrv_unref(tbs);
    return len < 0 ? len : 0;
}

typedef struct AddCowRawCo {
    BlockDriverState *bs;
    int ret;
} AddCowRawCo;

static void coroutine_fn add_cow_fill_entry(void *opaque)
{
    AddCowRawCo *rc = opaque;
    BDRVAddCowState *s = rc->bs->opaque;

    bdrv_graph_co_rdlock();
    qemu_co_mutex_lock(&s->lock);
    rc->ret = add_cow_fill_unallocated(rc->bs);
    qemu_co_mutex_unlock(&s->lock);
    bdrv_graph_co_rdunlock();
    aio_wait_kick();
}

/*
 * image_file_raw=on: make the image file the whole disk.  Only without a
 * backing file: unallocated clusters then read zeros, so zeroing them in
 * the image file and setting their bits changes nothing the guest sees.
 * While a backing file is named, the data it holds would be lost.
 */
static int GRAPH_RDLOCK
add_cow_make_image_file_raw(BlockDriverState *bs, Error **errp)
{
    BDRVAddCowState *s = bs->opaque;
    AddCowRawCo rc = { .bs = bs, .ret = -EINPROGRESS };

    if (s->header.backing_name_size || bs->backing) {
        error_setg(errp, "'%s' reads unallocated clusters from its backing "
                   "file '%s': copy them first (block-stream, or qemu-img "
                   "rebase -b '') and then set image_file_raw=on",
                   bs->filename, bs->backing_file);
        return -EINVAL;
    }
    if (!s->image) {
        error_setg(errp, "The image file of '%s' is not open", bs->filename);
        return -ENOTSUP;
    }
    aio_co_enter(bdrv_get_aio_context(bs),
                 qemu_coroutine_create(add_cow_fill_entry, &rc));
    BDRV_POLL_WHILE(bs, rc.ret == -EINPROGRESS);
    if (rc.ret < 0) {
        error_setg_errno(errp, -rc.ret, "Could not fill the unallocated "
                         "clusters of the image file");
    }
    return rc.ret;
}

/*
 * qemu-img amend.  What may change is what the spec lets a writer change
 * without touching guest data:
 *  - backing_fmt: the format of the (existing) backing file;
 *  - image_file: the name of the image file, which must exist already,
 *    open as raw, and cover the virtual size (the guest data is not moved:
 *    the user copied or renamed the file); image_fmt only accepts raw,
 *    the one format QEMU opens from a header;
 *  - image_file_raw: on fills the unallocated clusters of an image without
 *    backing file with zeros and sets the all-allocated flag, off clears it.
 * The cluster size (the bitmap's geometry) cannot change; the size changes
 * with qemu-img resize and the backing file with qemu-img rebase.
 * Names are switched by add_cow_write_name(), as rebase does.  The change
 * applies to the next open; the running node keeps the image file it has.
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
    const char *raw = qemu_opt_get(opts, ADD_COW_OPT_IMAGE_FILE_RAW);
    AddCowHeader h = s->header;
    g_autofree char *path = NULL;
    bool new_name;
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
    if (image_fmt && strcmp(image_fmt, "raw")) {
        /* See add_cow_do_open(): no format recursion from a header */
        error_setg(errp, "Unsupported image file format '%s' (only raw is "
                   "supported)", image_fmt);
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
        ret = add_cow_try_open_backing(path, backing_fmt, errp);
        if (ret < 0 && !force) {
            error_prepend(errp, "The backing file does not open as %s "
                          "(use --force to store it anyway): ", backing_fmt);
            return ret;
        } else if (ret < 0) {
            error_free(*errp);
            *errp = NULL;
        }
        memset(h.backing_format, 0, sizeof(h.backing_format));
        pstrcpy(h.backing_format, sizeof(h.backing_format), backing_fmt);
    }

    new_name = image_file && strcmp(image_file, s->image_name);
    if (new_name) {
        ret = add_cow_check_new_image(bs, image_file, force, errp);
        if (ret < 0) {
            return ret;
        }
    }

    if (raw && qemu_opt_get_bool(opts, ADD_COW_OPT_IMAGE_FILE_RAW, false)) {
        if (new_name) {
            error_setg(errp, "Set image_file_raw in a separate amend, after "
                       "the image file has changed");
            return -EINVAL;
        }
        ret = add_cow_make_image_file_raw(bs, errp);
        if (ret < 0) {
            return ret;
        }
        h.autoclear_features |= ADD_COW_AUTOCLEAR_ALL_ALLOCATED;
    } else if (raw) {
        h.autoclear_features &= ~ADD_COW_AUTOCLEAR_ALL_ALLOCATED;
    }

    if (new_name) {
        ret = add_cow_write_name(bs, &h, false, image_file);
        if (ret < 0) {
            error_setg_errno(errp, -ret, "Could not write the image file "
                             "name");
            return ret;
        }
    }
    if (!memcmp(&h, &s->header, sizeof(h))) {
        return 0;
    }
    ret = add_cow_update_header(bs, &h);
    if (ret < 0) {
        error_setg_errno(errp, -ret, "Could not write the add-cow header");
        return ret;
    }
    if (new_name) {
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
            .name = ADD_COW_OPT_IMAGE_FILE_RAW,
            .type = QEMU_OPT_BOOL,
            .help = "on: make the image file the whole disk (no backing "
                    "file only); off: clear the all-allocated flag"
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
