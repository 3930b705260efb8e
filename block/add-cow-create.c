/*
 * add-cow image creation, measure and amend
 *
 * Copyright (c) 2026 The add-cow authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#include "qemu/osdep.h"
#include "block/block_int.h"
#include "block/block-io.h"
#include "qapi/error.h"
#include "block/qdict.h"
#include "qapi/qapi-visit-block-core.h"
#include "qapi/qobject-input-visitor.h"
#include "qobject/qdict.h"
#include "qemu/cutils.h"
#include "qemu/option.h"
#include "system/block-backend.h"
#include "add-cow.h"

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

static int add_cow_check_cluster_size(uint64_t cluster_size, Error **errp)
{
    if (!is_power_of_2(cluster_size) ||
        cluster_size < (1 << ADD_COW_MIN_CLUSTER_BITS) ||
        cluster_size > (1 << ADD_COW_MAX_CLUSTER_BITS)) {
        error_setg(errp, "add-cow cluster size must be a power of two "
                   "between %d and %d", 1 << ADD_COW_MIN_CLUSTER_BITS,
                   1 << ADD_COW_MAX_CLUSTER_BITS);
        return -EINVAL;
    }
    return 0;
}

/* Check the creation options that need no file */
static int add_cow_create_check(BlockdevCreateOptionsAddCow *ac,
                                uint64_t *cluster_size, PreallocMode *prealloc,
                                const char **backing_fmt, Error **errp)
{
    *cluster_size = ac->has_cluster_size ? ac->cluster_size :
                    ADD_COW_DEFAULT_CLUSTER_SIZE;
    if (add_cow_check_cluster_size(*cluster_size, errp) < 0) {
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

/*
 * Check the image file of a new image whose .add-cow file is @bs, and make
 * it cover @size bytes.  An existing image file is kept and never shrunk.
 */
static int coroutine_fn GRAPH_UNLOCKED
add_cow_prepare_image(BlockDriverState *bs, BlockDriverState *image_bs,
                      const char *image_name, uint64_t size,
                      PreallocMode prealloc, Error **errp)
{
    BlockBackend *image_blk;
    int64_t image_len;
    int ret;

    if (!image_name[0] || strlen(image_name) > ADD_COW_MAX_NAME_SIZE) {
        error_setg(errp, "The image file needs a name of 1 to %d bytes",
                   ADD_COW_MAX_NAME_SIZE);
        return -EINVAL;
    }
    if (add_cow_same_file(bs, image_bs)) {
        error_setg(errp, "The image file '%s' is the add-cow file itself",
                   image_name);
        return -EINVAL;
    }
    image_blk = blk_co_new_with_bs(image_bs, BLK_PERM_WRITE | BLK_PERM_RESIZE,
                                   BLK_PERM_ALL, errp);
    if (!image_blk) {
        return -EPERM;
    }
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
    }

out:
    blk_co_unref(image_blk);
    return ret;
}

int coroutine_fn GRAPH_UNLOCKED
add_cow_co_create(BlockdevCreateOptions *opts, Error **errp)
{
    BlockdevCreateOptionsAddCow *ac;
    BlockDriverState *bs = NULL, *image_bs = NULL;
    BlockBackend *blk;
    const char *backing_fmt;
    g_autofree char *image_name = NULL;
    PreallocMode prealloc;
    bool image_created = false;
    uint64_t cluster_size, size;
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
    ret = add_cow_prepare_image(bs, image_bs, image_name, size, prealloc,
                                errp);
    if (ret < 0) {
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
    blk_co_unref(blk);

out:
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

/* The blockdev-create options (except driver and file) of qemu-img create */
static QDict *add_cow_create_qdict(QemuOpts *opts, Error **errp)
{
    g_autofree char *prealloc = NULL;
    QDict *qdict;

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
        qobject_unref(qdict);
        return NULL;
    }
    if (prealloc) {
        qdict_put_str(qdict, "preallocation", prealloc);
    }
    return qdict;
}

int coroutine_fn GRAPH_UNLOCKED
add_cow_co_create_opts(BlockDriver *drv, const char *filename,
                       QemuOpts *opts, Error **errp)
{
    BlockdevCreateOptions *create_options = NULL;
    BlockDriverState *bs = NULL;
    g_autofree char *replaced = NULL;
    QDict *qdict;
    Visitor *v;
    int ret;

    qdict = add_cow_create_qdict(opts, errp);
    if (!qdict) {
        return -EINVAL;
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

QemuOptsList add_cow_create_opts = {
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
 * The image file bytes a conversion of @in_bs needs, in *@required: the
 * clusters that hold data (whole clusters, as an allocating write fills
 * them), or everything if a backing file is named (it may share nothing
 * with the input, as qcow2 assumes).  Returns the size of @in_bs.
 */
static int64_t add_cow_measure_data(BlockDriverState *in_bs,
                                    uint64_t cluster_size, bool has_backing,
                                    uint64_t *required, Error **errp)
{
    int64_t ssize = bdrv_getlength(in_bs);
    int64_t offset, pnum = 0;

    if (ssize < 0) {
        error_setg_errno(errp, -ssize, "Unable to get image virtual_size");
        return ssize;
    }
    if (has_backing) {
        *required = ROUND_UP(ssize, cluster_size);
    }
    for (offset = 0; !has_backing && offset < ssize; offset += pnum) {
        int ret = bdrv_block_status_above(in_bs, NULL, offset, ssize - offset,
                                          &pnum, NULL, NULL);

        if (ret < 0) {
            error_setg_errno(errp, -ret, "Unable to get block status");
            return ret;
        }
        if (ret & BDRV_BLOCK_ZERO) {
            /* A new image without backing file reads zeros */
        } else if ((ret & (BDRV_BLOCK_DATA | BDRV_BLOCK_ALLOCATED)) ==
                   (BDRV_BLOCK_DATA | BDRV_BLOCK_ALLOCATED)) {
            pnum = ROUND_UP(offset + pnum, cluster_size) - offset;
            *required += offset % cluster_size + pnum;
        }
    }
    *required = MIN(*required, ROUND_UP(ssize, BDRV_SECTOR_SIZE));
    return ssize;
}

/*
 * qemu-img measure.  An add-cow disk is two files: the .add-cow file
 * (header and bitmap, its size known exactly) and the image file (guest
 * data at guest offsets, so at most the virtual size, and for a converted
 * image the clusters that hold data).  Both numbers are the sum of the two
 * files: "required" counts the .add-cow file plus the clusters of @in_bs
 * that hold data (everything if a backing file is named, as qcow2 does),
 * "fully allocated" the .add-cow file plus the whole virtual size.
 */
BlockMeasureInfo *add_cow_measure(QemuOpts *opts, BlockDriverState *in_bs,
                                  Error **errp)
{
    BlockMeasureInfo *info;
    uint64_t cluster_size, virtual_size, nb_clusters, meta, required = 0;
    bool has_backing;
    g_autofree char *prealloc_str = NULL;

    cluster_size = qemu_opt_get_size_del(opts, BLOCK_OPT_CLUSTER_SIZE,
                                         ADD_COW_DEFAULT_CLUSTER_SIZE);
    if (add_cow_check_cluster_size(cluster_size, errp) < 0) {
        return NULL;
    }
    has_backing = qemu_opt_get(opts, BLOCK_OPT_BACKING_FILE) != NULL;
    virtual_size = qemu_opt_get_size_del(opts, BLOCK_OPT_SIZE, 0);

    if (in_bs) {
        int64_t ssize = add_cow_measure_data(in_bs, cluster_size, has_backing,
                                             &required, errp);

        if (ssize < 0) {
            return NULL;
        }
        virtual_size = ssize;
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

/* Options amend refuses: they belong to other commands or cannot change */
static int add_cow_amend_refuse(QemuOpts *opts, Error **errp)
{
    const char *image_fmt = qemu_opt_get(opts, ADD_COW_OPT_IMAGE_FMT);

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
        /* See add_cow_read_names(): no format recursion from a header */
        error_setg(errp, "Unsupported image file format '%s' (only raw is "
                   "supported)", image_fmt);
        return -ENOTSUP;
    }
    return 0;
}

/* Store @fmt in @h as the backing format, once the backing file opens so */
static int GRAPH_RDLOCK
add_cow_amend_backing_fmt(BlockDriverState *bs, const char *fmt, bool force,
                          AddCowHeader *h, Error **errp)
{
    g_autofree char *path = NULL;
    int ret;

    if (!h->backing_name_size) {
        error_setg(errp, "The image has no backing file, so it has no "
                   "backing format to change");
        return -EINVAL;
    }
    if (!fmt[0] || strlen(fmt) >= ADD_COW_FMT_SIZE || !bdrv_find_format(fmt)) {
        error_setg(errp, "Unknown or invalid backing format '%s'", fmt);
        return -EINVAL;
    }
    path = add_cow_resolve(bs, bs->backing_file, errp);
    if (!path) {
        return -EINVAL;
    }
    ret = add_cow_try_open_backing(path, fmt, errp);
    if (ret < 0 && !force) {
        error_prepend(errp, "The backing file does not open as %s "
                      "(use --force to store it anyway): ", fmt);
        return ret;
    } else if (ret < 0) {
        error_free(*errp);
        *errp = NULL;
    }
    memset(h->backing_format, 0, sizeof(h->backing_format));
    pstrcpy(h->backing_format, sizeof(h->backing_format), fmt);
    return 0;
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
 * Names are switched by add_cow_switch_name(), as rebase does.  The change
 * applies to the next open; the running node keeps the image file it has.
 */
int GRAPH_RDLOCK
add_cow_amend_options(BlockDriverState *bs, QemuOpts *opts,
                      BlockDriverAmendStatusCB *status_cb, void *cb_opaque,
                      bool force, Error **errp)
{
    BDRVAddCowState *s = bs->opaque;
    const char *backing_fmt = qemu_opt_get(opts, BLOCK_OPT_BACKING_FMT);
    const char *image_file = qemu_opt_get(opts, ADD_COW_OPT_IMAGE_FILE);
    const char *raw = qemu_opt_get(opts, ADD_COW_OPT_IMAGE_FILE_RAW);
    bool new_name = image_file && strcmp(image_file, s->image_name);
    AddCowHeader h = s->header;
    int ret;

    ret = add_cow_amend_refuse(opts, errp);
    if (ret == 0 && backing_fmt) {
        ret = add_cow_amend_backing_fmt(bs, backing_fmt, force, &h, errp);
    }
    if (ret == 0 && new_name) {
        ret = add_cow_check_new_image(bs, image_file, force, errp);
    }
    if (ret < 0) {
        return ret;
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
        ret = add_cow_switch_name(bs, &h, false, image_file);
    } else if (memcmp(&h, &s->header, sizeof(h))) {
        ret = add_cow_update_header(bs, &h);
    } else {
        return 0;
    }
    if (ret < 0) {
        error_setg_errno(errp, -ret, "Could not write the add-cow header");
        return ret;
    }
    pstrcpy(bs->backing_format, sizeof(bs->backing_format),
            s->header.backing_format);
    if (status_cb) {
        status_cb(bs, 1, 1, cb_opaque);
    }
    return 0;
}

QemuOptsList add_cow_amend_opts = {
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
