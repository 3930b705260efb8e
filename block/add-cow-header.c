/*
 * add-cow header: encoding, validation, updates and the names it holds
 *
 * Copyright (c) 2026 The add-cow authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Sector 0 of the .add-cow file holds the fixed header; the names it points
 * to lie in the rest of the header area.  A name is only ever switched by
 * writing the new one into free bytes of that area first and the sector
 * second (add_cow_switch_name()), so no crash leaves a torn name.
 */

#include "qemu/osdep.h"
#include "block/block_int.h"
#include "block/block-io.h"
#include "qapi/error.h"
#include "qemu/bswap.h"
#include "qemu/cutils.h"
#include "qemu/memalign.h"
#include "qemu/range.h"
#include "add-cow.h"
#include "trace.h"

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

void add_cow_header_cpu_to_le(const AddCowHeader *cpu, AddCowHeader *le)
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

/* The fields every other check depends on */
static int add_cow_validate_fixed(const AddCowHeader *h, Error **errp)
{
    uint64_t unknown;

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
    return 0;
}

/* The bitmap's size and place, which must fit in the .add-cow file */
static int add_cow_validate_bitmap(const AddCowHeader *h, int64_t file_size,
                                   Error **errp)
{
    uint64_t nb_clusters = DIV_ROUND_UP(h->virtual_size,
                                        1ULL << h->cluster_bits);

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
    return 0;
}

/* The backing file's name location and format (both absent, or both set) */
static int add_cow_validate_backing(const AddCowHeader *h, Error **errp)
{
    int ret;

    if (h->backing_name_offset == 0 && h->backing_name_size == 0) {
        if (h->backing_format[0] || !add_cow_fmt_valid(h->backing_format,
                                                       true)) {
            error_setg(errp, "add-cow header has a backing file format but "
                       "no backing file");
            return -EINVAL;
        }
        return 0;
    }
    ret = add_cow_check_name_range(h, "backing file", h->backing_name_offset,
                                   h->backing_name_size, errp);
    if (ret < 0) {
        return ret;
    }
    if (h->backing_name_size == 0) {
        error_setg(errp, "Invalid backing file name size 0 in the add-cow "
                   "header");
        return -EINVAL;
    }
    if (!add_cow_fmt_valid(h->backing_format, false)) {
        error_setg(errp, "Invalid backing file format field in the add-cow "
                   "header");
        return -EINVAL;
    }
    if (ranges_overlap(h->image_name_offset, h->image_name_size,
                       h->backing_name_offset, h->backing_name_size)) {
        error_setg(errp, "Image and backing file names overlap in the "
                   "add-cow header");
        return -EINVAL;
    }
    return 0;
}

/* The image file's name location and format */
static int add_cow_validate_image(const AddCowHeader *h, Error **errp)
{
    int ret;

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
    int ret = add_cow_validate_fixed(h, errp);

    if (ret == 0) {
        ret = add_cow_validate_bitmap(h, file_size, errp);
    }
    if (ret == 0) {
        ret = add_cow_validate_image(h, errp);
    }
    if (ret == 0) {
        ret = add_cow_validate_backing(h, errp);
    }
    return ret;
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

void add_cow_set_geometry(BDRVAddCowState *s)
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
int coroutine_mixed_fn GRAPH_RDLOCK
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
int coroutine_mixed_fn GRAPH_RDLOCK
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
char *add_cow_name_path(const char *base, const char *name)
{
    g_autofree char *dir = NULL;

    if (path_is_absolute(name)) {
        return g_strdup(name);
    }
    dir = g_path_get_dirname(base);
    return g_build_filename(dir, name, NULL);
}

/* The local file below @bs, seen through raw format nodes, or NULL */
BlockDriverState *add_cow_local_file(BlockDriverState *bs)
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
bool add_cow_same_file(BlockDriverState *a, BlockDriverState *b)
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
bool add_cow_is_local_path(BlockDriverState *bs, const char *path)
{
    BlockDriverState *local = add_cow_local_file(bs);
    struct stat a, b;

    return local && stat(local->filename, &a) == 0 && stat(path, &b) == 0 &&
           a.st_dev == b.st_dev && a.st_ino == b.st_ino;
}

/* Read and validate the fixed header into s->header */
int coroutine_fn GRAPH_RDLOCK
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
int coroutine_fn GRAPH_RDLOCK
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

/*
 * Where the image file is: its node, or, when it is not open (qemu-img
 * info opens images with BDRV_O_NO_IO, and must not open files that an
 * untrusted header names), the path the header's name resolves to.
 */
char * GRAPH_RDLOCK add_cow_header_image_path(BlockDriverState *bs)
{
    BDRVAddCowState *s = bs->opaque;
    g_autofree char *dir = NULL;

    if (path_is_absolute(s->image_name)) {
        return g_strdup(s->image_name);
    }
    dir = bdrv_dirname(bs->file->bs, NULL);
    return dir ? g_strconcat(dir, s->image_name, NULL) : NULL;
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

/*
 * Switch to header @h with @name as its image file name (@backing false)
 * or backing file name (@backing true, NULL to drop it).  This is the only
 * way a name changes (rebase, change-backing-file, amend), and why a crash
 * cannot leave an unusable header:
 *
 *  1. The new name is written into bytes of the name area that no name of
 *     the header on disk uses, and the .add-cow file is flushed
 *     (add_cow_write_name()).  A crash during or after this step leaves the
 *     old header with both old names intact.
 *  2. Only then is sector 0 (which holds the name offsets and sizes and the
 *     formats) rewritten with one sector-sized write and flushed: after a
 *     crash it is either the old one or the new one, which points at a name
 *     that step 1 made stable.
 */
int coroutine_mixed_fn GRAPH_RDLOCK
add_cow_switch_name(BlockDriverState *bs, AddCowHeader *h, bool backing,
                    const char *name)
{
    BDRVAddCowState *s = bs->opaque;
    int ret;

    ret = add_cow_write_name(bs, h, backing, name);
    if (ret == 0) {
        ret = add_cow_update_header(bs, h);
    }
    if (ret == 0 && !backing) {
        g_free(s->image_name);
        s->image_name = g_strdup(name);
    }
    return ret;
}

/* Would the backing file name @name make @bs its own backing file? */
bool GRAPH_RDLOCK
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

/* Resolve @name like the header's names: relative to the .add-cow file */
char * GRAPH_RDLOCK
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
