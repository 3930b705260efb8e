/*
 * In-process mutation fuzzer for the add-cow block driver
 *
 * Copyright (c) 2026 The add-cow authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * The in-process counterpart of tests/qemu-iotests/tests/add_cow_fuzz.py:
 * the same seed corpus and mutations, but every case is opened by the
 * block layer inside this process instead of by a qemu-img/qemu-io child,
 * so that a sanitized build runs hundreds of cases per second.
 *
 * Seeds: valid add-cow images made here with bdrv_img_create() (every
 * cluster size from 512 bytes to 2 MiB, with and without a raw backing
 * file, some fully allocated), or the .add-cow files of --corpus DIR
 * together with the other files of DIR.  Each execution picks a seed,
 * applies 1 to 3 mutations, writes the result next to the seed's files
 * (the image file name in the header is relative to the .add-cow file)
 * and runs:
 *
 *   1. an info-style open (no I/O, no backing) and bdrv_query_image_info;
 *   2. a read-only open: check without repair, reads, block status;
 *   3. a read-write open: reads, writes, write-zeroes, discard, sometimes
 *      a resize, sometimes check with repair, flush and close.
 *
 * Errors are expected.  A crash, an assertion failure, a sanitizer report,
 * a hang (per-execution watchdog), a node or BlockBackend left behind after
 * close, a growing number of file descriptors, or a failed read-write open
 * that changed more of the .add-cow file than its unknown autoclear bits
 * (see docs/add-cow-testing-faults.md) end the run with the iteration
 * number.  Each execution's input is also kept as DIR/last-input.add-cow,
 * and "--seed S --first N --iterations 1" replays execution N alone.
 *
 * Built with -DADD_COW_LIBFUZZER (fuzz-add-cow-libfuzzer, in a build
 * configured with --enable-fuzzing: scripts/fuzz.sh), the same execution
 * runs under libFuzzer, with the coverage of block/add-cow*.c as feedback:
 * the input is the .add-cow file, opened beside the image and backing
 * files of a 64 KiB-cluster seed.  Half of the mutations are libFuzzer's,
 * half the format-aware ones below.  "--replay PATH..." runs such inputs
 * once each in a build without libFuzzer: a crash reproducer, and the line
 * coverage of a corpus in the gcov build (scripts/coverage.sh).
 */

#include "qemu/osdep.h"
#include <getopt.h>
#include "block/block.h"
#include "block/block_int-global-state.h"
#include "block/qapi.h"
#include "system/block-backend.h"
#include "qapi/error.h"
#include "qapi/qapi-types-block-core.h"
#include "qobject/qdict.h"
#include "qemu/bswap.h"
#include "qemu/main-loop.h"
#include "qemu/memalign.h"
#include "qemu/module.h"

/* The fixed header (block/add-cow.h, docs/specs/add-cow.txt) */
#define HDR_SIZE            128
#define IMAGE_FORMAT_OFF    80
#define BACKING_FORMAT_OFF  96
#define FMT_SIZE            16
#define AUTOCLEAR_OFF       32
#define NAME_AREA_OFF       1024

typedef struct Field {
    const char *name;
    unsigned off;
    unsigned size;              /* 4 or 8 */
} Field;

static const Field fields[] = {
    { "magic", 0, 4 },
    { "header_size", 4, 4 },
    { "cluster_bits", 8, 4 },
    { "reserved0", 12, 4 },
    { "incompatible_features", 16, 8 },
    { "compatible_features", 24, 8 },
    { "autoclear_features", 32, 8 },
    { "virtual_size", 40, 8 },
    { "bitmap_offset", 48, 8 },
    { "bitmap_size", 56, 8 },
    { "image_name_offset", 64, 4 },
    { "image_name_size", 68, 4 },
    { "backing_name_offset", 72, 4 },
    { "backing_name_size", 76, 4 },
};

enum {
    F_HEADER_SIZE = 1, F_CLUSTER_BITS = 2, F_AUTOCLEAR = 6,
    F_VIRTUAL_SIZE = 7, F_BITMAP_OFFSET = 8, F_BITMAP_SIZE = 9,
    F_IMAGE_NAME_OFFSET = 10, F_IMAGE_NAME_SIZE = 11,
    F_BACKING_NAME_OFFSET = 12, F_BACKING_NAME_SIZE = 13,
};

static const uint64_t interesting[] = {
    0, 1, 2, 7, 8, 9, 21, 22, 31, 32, 63, 64, 127, 128, 129,
    255, 256, 511, 512, 513, 4095, 4096, 4097, 16383, 16384,
    16385, 65535, 65536, 1 << 20, (1 << 20) + 1, 1 << 24,
    0x7fffffff, 0x80000000, 0xfffffe00, 0xffffffff,
    /* 64-bit only from here */
    1ULL << 32, (1ULL << 32) + 512, 1ULL << 40, 1ULL << 50, 1ULL << 55,
    1ULL << 62, 1ULL << 63, (1ULL << 63) - 512, UINT64_MAX - 511,
    UINT64_MAX, 0x7ffffffffffffe00ULL,
};
#define NB_INTERESTING32 35

typedef struct Value {
    const char *s;
    unsigned len;               /* the strings may contain NUL bytes */
} Value;
#define V(x) { x, sizeof(x) - 1 }

static const Value format_values[] = {
    V(""), V("raw"), V("qcow2"), V("add-cow"), V("qed"), V("vmdk"),
    V("luks"), V("file"), V("blkdebug"), V("null-co"), V("nbd"), V("json"),
    V("raw\0garbage"), V("xxxxxxxxxxxxxxxx"), V("xxxxxxxxxxxxxxx"),
    V("\xff\xff\xff\xff\xff\xff\xff\xff"), V("RAW"), V("../raw"),
    V("raw "), V("vvfat"), V("host_device"),
};

/*
 * As add_cow_fuzz.py, without /proc/self/mem: here it would be this
 * process's own memory that a read-write open writes guest data to.
 * "@long4095"/"@long4096"/"@long300" stand for names of that many 'x'/'a'.
 */
static const Value name_values[] = {
    V("seed.add-cow"), V("./seed.add-cow"), V("/dev/null"), V("/dev/zero"),
    V("/nonexistent/file"), V(""), V("\0"), V("a\0b"), V(".."), V("."),
    V("/"), V("//"), V("base.raw"), V("seed.add-cow.img"),
    V("nbd://127.0.0.1:1/x"), V("json:{\"driver\":\"null-co\"}"),
    V("json:{\"driver\":\"file\",\"filename\":\"x\"}"),
    V("file:seed.add-cow"), V("null-co://"), V("@long4095"),
    V("@long4096"), V("\xff\xfe"), V("%s%s%n"), V("@long300"),
    V("case.add-cow"),
};

/* ---- state ---------------------------------------------------------- */

typedef struct SeedFile {
    char *path;
    int64_t len;
} SeedFile;

typedef struct Seed {
    char *desc;
    char *dir;
    char *seed_path;            /* on-disk copy of data, restored each time */
    char *case_path;            /* where the mutated image is written */
    uint8_t *data;
    size_t len;
    GArray *files;              /* SeedFile: other files, sizes restored */
} Seed;

typedef struct Stats {
    uint64_t execs;
    uint64_t info_ok;
    uint64_t ro_ok;
    uint64_t rw_ok;
    uint64_t opened;            /* read-only or read-write open worked */
    uint64_t rejected;          /* no open with I/O worked */
    uint64_t check_corrupt;     /* read-only check found corruptions */
    uint64_t repairs;
    uint64_t still_corrupt;     /* check after a repair still unhappy */
    uint64_t autoclear_notes;
    uint64_t resizes_ok;
} Stats;

static const char *opt_dir;
static unsigned opt_timeout = 60;           /* 0: no watchdog */
static bool opt_verbose;
static bool opt_flush;

static Stats st;
static char *last_input_path;    /* NULL: not kept */
static uint8_t *io_buf;
#define IO_BUF_SIZE (256 * 1024)

/* Pre-formatted for the signal handlers */
static char death_msg[2048];
static size_t death_msg_len;

/* ---- PRNG: splitmix64, one stream per iteration ------------------- */

static uint64_t rng_state;

static uint64_t rnd(void)
{
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ULL);

    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static uint64_t rnd_below(uint64_t n)
{
    return n ? rnd() % n : 0;
}

static void rng_seed(uint64_t seed, uint64_t iteration)
{
    rng_state = seed * 0xd1342543de82ef95ULL + iteration;
    rnd();
    rng_state ^= rnd();
}

/* ---- helpers -------------------------------------------------------- */

static void G_GNUC_PRINTF(1, 2) G_NORETURN die(const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    fprintf(stderr, "fuzz-add-cow: FAILURE: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    fflush(stdout);
    if (write(2, death_msg, death_msg_len) < 0) {
        /* nothing to do */
    }
    abort();
}

static void write_file(const char *path, const void *data, size_t len)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);

    if (fd < 0) {
        die("cannot create %s: %s", path, strerror(errno));
    }
    if (qemu_write_full(fd, data, len) != len) {
        die("cannot write %s: %s", path, strerror(errno));
    }
    close(fd);
}

static void set_file_len(const char *path, int64_t len)
{
    if (truncate(path, len) < 0 && errno != ENOENT) {
        die("cannot truncate %s: %s", path, strerror(errno));
    }
}

static int count_fds(void)
{
    GDir *d = g_dir_open("/proc/self/fd", 0, NULL);
    int n = 0;

    if (!d) {
        return -1;
    }
    while (g_dir_read_name(d)) {
        n++;
    }
    g_dir_close(d);
    return n;
}

static void report_error(Error *err)
{
    if (opt_verbose && err) {
        error_report_err(err);
    } else {
        error_free(err);
    }
}

/* ---- seeds ---------------------------------------------------------- */

static void seed_add_file(Seed *s, const char *path)
{
    struct stat sb;
    SeedFile f;

    if (stat(path, &sb) < 0) {
        die("cannot stat %s: %s", path, strerror(errno));
    }
    f.path = g_strdup(path);
    f.len = sb.st_size;
    g_array_append_val(s->files, f);
}

static Seed *seed_new(const char *dir, const char *desc)
{
    Seed *s = g_new0(Seed, 1);

    s->desc = g_strdup(desc);
    s->dir = g_strdup(dir);
    s->case_path = g_build_filename(dir, "case.add-cow", NULL);
    s->files = g_array_new(false, false, sizeof(SeedFile));
    return s;
}

static void fill_file(const char *path, int byte, int64_t len)
{
    g_autofree uint8_t *buf = g_malloc(len);

    memset(buf, byte, len);
    write_file(path, buf, len);
}

/*
 * As add_cow_fuzz.py: 5.5 clusters (at least 64.5 KiB), bits set for a
 * partial write in cluster 1 and a full write of cluster 3; "full" seeds
 * have every cluster written (the all-allocated autoclear bit).
 */
static Seed *make_seed(unsigned cluster_bits, char kind)
{
    int64_t cs = 1LL << cluster_bits;
    int64_t size = MAX(5 * cs + cs / 2, 65536 + 512);
    g_autofree char *name = g_strdup_printf("seed-%" PRId64 "-%c", cs, kind);
    g_autofree char *dir = g_build_filename(opt_dir, name, NULL);
    g_autofree char *base = NULL;
    g_autofree char *image = NULL;
    g_autofree char *opts = g_strdup_printf("cluster_size=%" PRId64, cs);
    g_autofree uint8_t *buf = NULL;
    Error *err = NULL;
    BlockBackend *blk;
    Seed *s;
    gsize len;

    size -= size % 512;
    s = seed_new(dir, name);
    s->seed_path = g_build_filename(dir, "seed.add-cow", NULL);
    if (g_mkdir_with_parents(dir, 0755) < 0) {
        die("cannot create %s: %s", dir, strerror(errno));
    }
    /* bdrv_img_create() keeps an existing image file: start afresh */
    unlink(s->seed_path);
    unlink(s->case_path);
    image = g_build_filename(dir, "seed.add-cow.img", NULL);
    unlink(image);
    if (kind == 'b') {
        base = g_build_filename(dir, "base.raw", NULL);
        fill_file(base, 0x42, size);
    }
    bdrv_img_create(s->seed_path, "add-cow", base ? "base.raw" : NULL,
                    base ? "raw" : NULL, opts, size, 0, true, &err);
    if (err) {
        error_prepend(&err, "seed %s: ", name);
        error_report_err(err);
        exit(1);
    }

    blk = blk_new_open(s->seed_path, NULL, qdict_new(), BDRV_O_RDWR, &err);
    if (!blk) {
        error_prepend(&err, "seed %s: ", name);
        error_report_err(err);
        exit(1);
    }
    buf = g_malloc(cs);
    if (kind == 'f') {
        memset(buf, 0x66, cs);
        for (int64_t off = 0; off < size; off += cs) {
            if (blk_pwrite(blk, off, MIN(cs, size - off), buf, 0) < 0) {
                die("seed %s: write failed", name);
            }
        }
    } else {
        memset(buf, 0x11, 512);
        if (blk_pwrite(blk, cs + 512, 512, buf, 0) < 0) {
            die("seed %s: write failed", name);
        }
        memset(buf, 0x33, cs);
        if (blk_pwrite(blk, 3 * cs, cs, buf, 0) < 0) {
            die("seed %s: write failed", name);
        }
    }
    blk_unref(blk);

    if (!g_file_get_contents(s->seed_path, (char **)&s->data, &len, NULL)) {
        die("cannot read %s", s->seed_path);
    }
    s->len = len;
    seed_add_file(s, image);
    if (base) {
        seed_add_file(s, base);
    }
    return s;
}

/* ---- mutations (as add_cow_fuzz.py) --------------------------------- */

typedef struct Buf {
    uint8_t *p;
    size_t len;
    size_t cap;
    int64_t truncate_to;        /* -1: none */
    GString *ops;
} Buf;

static void buf_resize(Buf *b, size_t len)
{
    if (len > b->cap) {
        b->cap = MAX(len, b->cap * 2);
        b->p = g_realloc(b->p, b->cap);
    }
    if (len > b->len) {
        memset(b->p + b->len, 0, len - b->len);
    }
    b->len = len;
}

static uint64_t get_field(Buf *b, const Field *f)
{
    if (f->off + f->size > b->len) {
        return 0;
    }
    /* ldl_le_p() returns a (signed) int */
    return f->size == 4 ? (uint32_t)ldl_le_p(b->p + f->off)
                        : ldq_le_p(b->p + f->off);
}

static void set_field(Buf *b, const Field *f, uint64_t v)
{
    if (f->off + f->size > b->len) {
        buf_resize(b, f->off + f->size);
    }
    if (f->size == 4) {
        stl_le_p(b->p + f->off, v);
    } else {
        stq_le_p(b->p + f->off, v);
    }
}

static void mut_field(Buf *b)
{
    const Field *f = &fields[rnd_below(ARRAY_SIZE(fields))];
    uint64_t old = get_field(b, f);
    bool is64 = f->size == 8;
    uint64_t v;
    static const int64_t deltas[] = { -512, -1, 1, 512, 4096, -4096 };
    static const unsigned muls[] = { 2, 8, 1 << 10, 1 << 20 };

    switch (rnd_below(6)) {
    case 0:
        v = interesting[rnd_below(is64 ? ARRAY_SIZE(interesting)
                                       : NB_INTERESTING32)];
        break;
    case 1:
        v = old + deltas[rnd_below(ARRAY_SIZE(deltas))];
        break;
    case 2:
        v = old ^ (1ULL << rnd_below(is64 ? 64 : 32));
        break;
    case 3:
        v = old * muls[rnd_below(ARRAY_SIZE(muls))];
        break;
    case 4:
        v = old >> (1 + rnd_below(7));
        break;
    default:
        v = rnd();
        break;
    }
    if (!is64) {
        v = (uint32_t)v;
    }
    set_field(b, f, v);
    g_string_append_printf(b->ops, "%s=0x%" PRIx64 " ", f->name, v);
}

static void mut_geometry(Buf *b)
{
    static const uint64_t sizes[] = {
        1ULL << 30, 1ULL << 40, 1ULL << 50, (1ULL << 63) - 512,
    };
    static const uint32_t cbs[] = {
        9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 0, 8, 22, 63, 64,
    };
    static const uint32_t hsizes[] = {
        0, 128, 512, 1024, 4096, 1 << 20, (1 << 20) + 512,
    };
    uint64_t cb = get_field(b, &fields[F_CLUSTER_BITS]);
    uint64_t v, nb;

    switch (rnd_below(4)) {
    case 0:
        /* Larger virtual size with a matching bitmap size: past EOF */
        v = sizes[rnd_below(ARRAY_SIZE(sizes))];
        cb = MIN(cb, 63);
        nb = v / (1ULL << cb) + !!(v % (1ULL << cb));
        set_field(b, &fields[F_VIRTUAL_SIZE], v);
        set_field(b, &fields[F_BITMAP_SIZE], ROUND_UP((nb + 7) / 8, 512));
        g_string_append_printf(b->ops, "vs=0x%" PRIx64 "+bitmap ", v);
        break;
    case 1:
        v = cbs[rnd_below(ARRAY_SIZE(cbs))];
        set_field(b, &fields[F_CLUSTER_BITS], v);
        g_string_append_printf(b->ops, "cluster_bits=%" PRIu64 " ", v);
        break;
    case 2:
        v = hsizes[rnd_below(ARRAY_SIZE(hsizes))];
        set_field(b, &fields[F_HEADER_SIZE], v);
        g_string_append_printf(b->ops, "header_size=%" PRIu64 " ", v);
        break;
    default: {
        const uint64_t offs[] = {
            0, 128, 512, 4096, 16384 - 512, 16384 + 512, b->len,
            b->len + 512, 1ULL << 40,
        };
        v = offs[rnd_below(ARRAY_SIZE(offs))];
        set_field(b, &fields[F_BITMAP_OFFSET], v);
        g_string_append_printf(b->ops, "bitmap_offset=%" PRIu64 " ", v);
        break;
    }
    }
}

static void mut_format(Buf *b)
{
    unsigned off = rnd_below(2) ? IMAGE_FORMAT_OFF : BACKING_FORMAT_OFF;
    unsigned i = rnd_below(ARRAY_SIZE(format_values));

    buf_resize(b, MAX(b->len, off + FMT_SIZE));
    memset(b->p + off, 0, FMT_SIZE);
    memcpy(b->p + off, format_values[i].s, format_values[i].len);
    g_string_append_printf(b->ops, "fmt@%u=%u ", off, i);
}

static void name_value(unsigned i, char **name, size_t *len)
{
    const char *v = name_values[i].s;

    if (g_str_has_prefix(v, "@long")) {
        *len = atoi(v + 5);
        *name = g_malloc(*len);
        memset(*name, *len == 300 ? 'a' : 'x', *len);
    } else {
        *len = name_values[i].len;
        *name = g_memdup2(v, *len);
    }
}

static void mut_name(Buf *b)
{
    bool backing = rnd_below(2);
    const Field *foff = &fields[backing ? F_BACKING_NAME_OFFSET
                                        : F_IMAGE_NAME_OFFSET];
    const Field *fsize = &fields[backing ? F_BACKING_NAME_SIZE
                                         : F_IMAGE_NAME_SIZE];
    const char *which = backing ? "backing" : "image";
    unsigned i = rnd_below(ARRAY_SIZE(name_values));
    g_autofree char *v = NULL;
    size_t len;
    uint64_t off, size;

    name_value(i, &v, &len);
    if (backing && !strcmp(name_values[i].s, "case.add-cow")) {
        /*
         * A backing file that is the image itself recurses in the generic
         * block layer, for qcow2 as well (docs/add-cow-testing-faults.md)
         */
        g_free(v);
        name_value(0, &v, &len);
    }
    switch (rnd_below(3)) {
    case 0:
        /* New name in the name area */
        if (NAME_AREA_OFF + len > b->len) {
            buf_resize(b, NAME_AREA_OFF + len);
        }
        if (len) {
            memcpy(b->p + NAME_AREA_OFF, v, len);
        }
        set_field(b, foff, NAME_AREA_OFF);
        set_field(b, fsize, len);
        g_string_append_printf(b->ops, "%s_name=%u ", which, i);
        break;
    case 1: {
        /* Location nonsense */
        const uint64_t offs[] = {
            0, 64, 127, 128, 129, 16383, 16384, b->len - 1, b->len,
            1ULL << 31, 0xffffffff,
        };
        static const uint64_t sizes[] = {
            0, 1, 4, 13, 255, 4095, 4096, 1 << 20, 0xffffffff,
        };
        off = (uint32_t)offs[rnd_below(ARRAY_SIZE(offs))];
        size = sizes[rnd_below(ARRAY_SIZE(sizes))];
        set_field(b, foff, off);
        set_field(b, fsize, size);
        g_string_append_printf(b->ops, "%s_name@0x%" PRIx64 "+0x%" PRIx64
                               " ", which, off, size);
        break;
    }
    default:
        /* Overwrite one byte of the current name */
        off = get_field(b, foff);
        size = get_field(b, fsize);
        if (off && size && off + size <= b->len) {
            static const uint8_t bytes[] = { 0, 0x2f, 0x2e, 0xff };
            uint64_t pos = off + rnd_below(size);
            unsigned k = rnd_below(5);

            b->p[pos] = k < 4 ? bytes[k] : rnd_below(256);
            g_string_append_printf(b->ops, "%s_name[%" PRIu64 "]=0x%x ",
                                   which, pos - off, b->p[pos]);
        }
        break;
    }
}

static void mut_bitmap(Buf *b)
{
    uint64_t bo = get_field(b, &fields[F_BITMAP_OFFSET]);
    uint64_t bs = get_field(b, &fields[F_BITMAP_SIZE]);
    uint64_t end;

    if (bo >= b->len) {
        return;
    }
    end = bs > b->len - bo ? b->len : bo + bs;
    switch (rnd_below(4)) {
    case 0:
        memset(b->p + bo, 0xff, end - bo);
        g_string_append(b->ops, "bitmap=ff ");
        break;
    case 1:
        for (uint64_t i = bo; i < end; i++) {
            b->p[i] = rnd();
        }
        g_string_append(b->ops, "bitmap=random ");
        break;
    case 2:
        /* All-allocated flag with an incomplete bitmap, or the reverse */
        set_field(b, &fields[F_AUTOCLEAR],
                  get_field(b, &fields[F_AUTOCLEAR]) ^ 1);
        g_string_append(b->ops, "autoclear^1 ");
        break;
    default:
        if (end > bo) {
            b->p[end - 1] = 0xff;   /* padding bits past the last cluster */
        }
        g_string_append(b->ops, "bitmap_padding ");
        break;
    }
}

static void mut_truncate(Buf *b)
{
    switch (rnd_below(3)) {
    case 0: {
        const int64_t ns[] = {
            0, 1, 64, 127, 128, 511, 512, 1024, 16383, 16384,
            (int64_t)b->len - 1, (int64_t)b->len - 512,
        };
        b->truncate_to = MAX(0, ns[rnd_below(ARRAY_SIZE(ns))]);
        g_string_append_printf(b->ops, "truncate=%" PRId64 " ",
                               b->truncate_to);
        break;
    }
    case 1: {
        static const unsigned ext[] = { 1, 511, 512, 65536 };
        unsigned n = ext[rnd_below(ARRAY_SIZE(ext))];

        buf_resize(b, b->len + n);
        g_string_append_printf(b->ops, "extend=%u ", n);
        break;
    }
    default: {
        static const unsigned offs[] = { 12, 112, 120, 127 };
        unsigned off = offs[rnd_below(ARRAY_SIZE(offs))];

        buf_resize(b, MAX(b->len, HDR_SIZE));
        b->p[off] = 1 + rnd_below(255);
        g_string_append_printf(b->ops, "reserved[%u] ", off);
        break;
    }
    }
}

static void mut_bytes(Buf *b)
{
    unsigned n = 1 + rnd_below(8);

    g_string_append(b->ops, "bytes[");
    for (unsigned i = 0; i < n && b->len; i++) {
        const size_t limits[] = { 128, 512, 4096, b->len };
        size_t limit = MIN(b->len, limits[rnd_below(4)]);
        size_t pos = rnd_below(limit);

        b->p[pos] = rnd();
        g_string_append_printf(b->ops, "%zu,", pos);
    }
    g_string_append(b->ops, "] ");
}

/* Not in add_cow_fuzz.py: plain bit flips, mostly in the fixed header */
static void mut_bitflip(Buf *b)
{
    unsigned n = 1 + rnd_below(4);

    g_string_append(b->ops, "flip[");
    for (unsigned i = 0; i < n && b->len; i++) {
        size_t limit = rnd_below(4) ? MIN(b->len, HDR_SIZE) : b->len;
        size_t pos = rnd_below(limit);
        unsigned bit = rnd_below(8);

        b->p[pos] ^= 1 << bit;
        g_string_append_printf(b->ops, "%zu.%u,", pos, bit);
    }
    g_string_append(b->ops, "] ");
}

typedef void MutateFn(Buf *b);

static MutateFn *const mutators[] = {
    mut_field, mut_field, mut_field, mut_field, mut_field,
    mut_geometry, mut_geometry,
    mut_format, mut_format,
    mut_name, mut_name, mut_name,
    mut_bitmap, mut_bitmap,
    mut_truncate,
    mut_bytes, mut_bytes, mut_bytes,
    mut_bitflip, mut_bitflip,
};

static void buf_set(Buf *b, const uint8_t *data, size_t len)
{
    b->len = 0;
    buf_resize(b, len);
    if (len) {
        memcpy(b->p, data, len);
    }
}

/* 1 to 3 mutations of b, in place */
static void mutate(Buf *b)
{
    static const unsigned counts[] = { 1, 1, 1, 2, 2, 3 };
    unsigned n = counts[rnd_below(ARRAY_SIZE(counts))];

    b->truncate_to = -1;
    g_string_truncate(b->ops, 0);
    for (unsigned i = 0; i < n; i++) {
        mutators[rnd_below(ARRAY_SIZE(mutators))](b);
    }
    if (b->truncate_to >= 0 && b->truncate_to < b->len) {
        b->len = b->truncate_to;
    }
}

/* ---- execution ------------------------------------------------------ */

static BlockBackend *open_image(const char *path, int flags)
{
    QDict *opts = qdict_new();
    Error *err = NULL;
    BlockBackend *blk;

    qdict_put_str(opts, "driver", "add-cow");
    if (!opt_flush) {
        flags |= BDRV_O_NO_FLUSH;
    }
    blk = blk_new_open(path, NULL, opts, flags, &err);
    report_error(err);
    return blk;
}

/* Cluster size for choosing offsets: the header's, when it is sane */
static int64_t cluster_size_of(const Buf *b)
{
    uint32_t cb = b->len >= 12 ? ldl_le_p(b->p + 8) : 0;

    return cb >= 9 && cb <= 21 ? 1LL << cb : 65536;
}

static void do_reads(BlockBackend *blk, int64_t cs)
{
    int64_t len = blk_getlength(blk);
    int64_t chunk = MIN(cs, 64 * 1024);
    int64_t offs[12];
    unsigned n = 0;

    if (len <= 0) {
        return;
    }
    /* The first clusters, where the seeds have their bits set */
    for (int i = 0; i < 6; i++) {
        offs[n++] = i * cs;
    }
    offs[n++] = MAX(0, len - chunk);            /* the (partial) last one */
    offs[n++] = QEMU_ALIGN_DOWN(rnd_below(len), 512);
    offs[n++] = cs - 512;                       /* across a boundary */
    for (unsigned i = 0; i < n; i++) {
        if (offs[i] < len) {
            blk_pread(blk, offs[i], MIN(chunk, len - offs[i]), io_buf, 0);
        }
    }
    /* Unaligned */
    offs[0] = rnd_below(len);
    blk_pread(blk, offs[0], MIN(1 + rnd_below(8192), len - offs[0]),
              io_buf, 0);
}

static void do_map(BlockBackend *blk)
{
    BlockDriverState *bs = blk_bs(blk);
    int64_t len = blk_getlength(blk);
    int64_t off = 0, pnum, map;
    BlockDriverState *file;

    for (int i = 0; i < 64 && off < len; i++) {
        int ret = bdrv_block_status_above(bs, NULL, off, len - off, &pnum,
                                          &map, &file);
        if (ret < 0 || pnum <= 0) {
            break;
        }
        off += pnum;
    }
}

static void do_writes(BlockBackend *blk, int64_t cs)
{
    int64_t len = blk_getlength(blk);
    int64_t off, n;

    if (len <= 0) {
        return;
    }
    memset(io_buf, 0x5a, IO_BUF_SIZE);
    /* A partial write into cluster 1 (allocated in the seeds) */
    if (cs + 512 < len) {
        blk_pwrite(blk, cs + 512, 512, io_buf, 0);
    }
    /* An allocating partial write somewhere, unaligned */
    off = rnd_below(len);
    n = MIN(1 + rnd_below(8192), len - off);
    blk_pwrite(blk, off, n, io_buf, 0);
    /* The tail of the disk */
    off = MAX(0, len - 512);
    blk_pwrite(blk, off, len - off, io_buf, 0);
    /* Zeroes over cluster 2, discard of cluster 4 */
    if (2 * cs < len) {
        blk_pwrite_zeroes(blk, 2 * cs, MIN(cs, len - 2 * cs),
                          rnd_below(2) ? BDRV_REQ_MAY_UNMAP : 0);
    }
    if (4 * cs < len && rnd_below(2)) {
        blk_pdiscard(blk, 4 * cs, MIN(cs, len - 4 * cs));
    }
    blk_flush(blk);
}

static void do_resize(BlockBackend *blk, int64_t cs)
{
    int64_t len = blk_getlength(blk);
    Error *err = NULL;

    if (len < 0) {
        return;
    }
    if (blk_truncate(blk, len + cs, false, PREALLOC_MODE_OFF, 0,
                     &err) == 0) {
        st.resizes_ok++;
        blk_pwrite(blk, len, 512, io_buf, 0);
        blk_truncate(blk, len, false, PREALLOC_MODE_OFF, 0, &err);
    }
    report_error(err);
}

/* Compare the .add-cow file after a failed read-write open */
static void check_unmodified(const char *path, const Buf *b)
{
    g_autofree uint8_t *after = NULL;
    gsize len;

    if (!g_file_get_contents(path, (char **)&after, &len, NULL)) {
        die("cannot read back %s", path);
    }
    if (len == b->len && (!len || !memcmp(after, b->p, len))) {
        return;
    }
    /* Like qcow2, unknown autoclear bits are cleared before failing */
    if (len == b->len && len >= 40 && !memcmp(after, b->p, 32) &&
        !memcmp(after + 40, b->p + 40, len - 40) &&
        ldq_le_p(after + 32) == (ldq_le_p(b->p + 32) & 1)) {
        st.autoclear_notes++;
        return;
    }
    die("a failed read-write open modified the .add-cow file");
}

static void restore_seed_files(const Seed *s)
{
    write_file(s->seed_path, s->data, s->len);
    for (guint i = 0; i < s->files->len; i++) {
        SeedFile *f = &g_array_index(s->files, SeedFile, i);

        set_file_len(f->path, f->len);
    }
}

static void run_case(const Seed *s, const Buf *b)
{
    int64_t cs = cluster_size_of(b);
    BdrvCheckResult res;
    BlockBackend *blk;
    bool opened = false;

    if (opt_timeout) {
        alarm(opt_timeout);
    }
    restore_seed_files(s);
    if (last_input_path) {
        write_file(last_input_path, b->p, b->len);
    }
    write_file(s->case_path, b->p, b->len);
    st.execs++;

    /* 1. qemu-img info: no I/O, no backing file */
    blk = open_image(s->case_path, BDRV_O_NO_BACKING | BDRV_O_NO_IO);
    if (blk) {
        ImageInfo *info = NULL;
        Error *err = NULL;

        st.info_ok++;
        bdrv_graph_rdlock_main_loop();
        bdrv_query_image_info(blk_bs(blk), &info, false, false, &err);
        bdrv_graph_rdunlock_main_loop();
        qapi_free_ImageInfo(info);
        report_error(err);
        blk_unref(blk);
    }

    /* 2. Read-only: check without repair, reads, map */
    blk = open_image(s->case_path, 0);
    if (blk) {
        st.ro_ok++;
        opened = true;
        memset(&res, 0, sizeof(res));
        if (bdrv_check(blk_bs(blk), &res, 0) == 0 && res.corruptions) {
            st.check_corrupt++;
        }
        do_reads(blk, cs);
        do_map(blk);
        blk_unref(blk);
    }

    /* 3. Read-write: reads, writes, resize, check with repair */
    blk = open_image(s->case_path, BDRV_O_RDWR | BDRV_O_RESIZE);
    if (!blk) {
        check_unmodified(s->case_path, b);
    } else {
        bool repair = !rnd_below(4);

        st.rw_ok++;
        opened = true;
        do_reads(blk, cs);
        do_writes(blk, cs);
        if (!rnd_below(8)) {
            do_resize(blk, cs);
        }
        if (repair) {
            memset(&res, 0, sizeof(res));
            bdrv_check(blk_bs(blk), &res, BDRV_FIX_ERRORS | BDRV_FIX_LEAKS);
            st.repairs++;
        }
        do_map(blk);
        blk_unref(blk);

        /* A repaired image must check clean */
        if (repair) {
            blk = open_image(s->case_path, 0);
            if (blk) {
                memset(&res, 0, sizeof(res));
                if (bdrv_check(blk_bs(blk), &res, 0) < 0 ||
                    res.corruptions || res.check_errors) {
                    st.still_corrupt++;
                    if (opt_verbose) {
                        fprintf(stderr, "still corrupt after repair\n");
                    }
                }
                blk_unref(blk);
            }
        }
    }
    if (opened) {
        st.opened++;
    } else {
        st.rejected++;
    }

    /* Nothing may stay behind once the last reference is gone */
    if (bdrv_next_all_states(NULL)) {
        die("a block node is left after closing everything (%s)",
            bdrv_get_node_name(bdrv_next_all_states(NULL)));
    }
    if (blk_all_next(NULL)) {
        die("a BlockBackend is left after closing everything");
    }
    if (opt_timeout) {
        alarm(0);
    }
}

static void print_outcomes(void)
{
    printf("outcomes: %" PRIu64 " info opens, %" PRIu64 " read-only opens, "
           "%" PRIu64 " read-write opens ok; %" PRIu64 " checks found "
           "corruption; %" PRIu64 " repairs, %" PRIu64 " not clean after "
           "repair; %" PRIu64 " resizes; %" PRIu64 " failed opens cleared "
           "unknown autoclear bits\n", st.info_ok, st.ro_ok, st.rw_ok,
           st.check_corrupt, st.repairs, st.still_corrupt, st.resizes_ok,
           st.autoclear_notes);
}

/* ---- single inputs (libFuzzer, --replay) ---------------------------- */

/*
 * The files an input is opened beside: those of the seed with 64 KiB
 * clusters and a backing file ("seed.add-cow.img", "base.raw"), the image
 * file extended so that it covers the virtual size of every seed that
 * scripts/fuzz.sh makes.
 */
#define INPUT_IMAGE_LEN (64 * 1024 * 1024)

static Seed *input_context(void)
{
    Seed *s = make_seed(16, 'b');

    g_array_index(s->files, SeedFile, 0).len = INPUT_IMAGE_LEN;
    return s;
}

/* FNV-1a: an input makes its own random choices, so a replay repeats them */
static uint64_t input_hash(const uint8_t *data, size_t len)
{
    uint64_t h = 0xcbf29ce484222325ULL;

    for (size_t i = 0; i < len; i++) {
        h = (h ^ data[i]) * 0x100000001b3ULL;
    }
    return h;
}

static void run_input(const Seed *s, Buf *b, const uint8_t *data, size_t len)
{
    buf_set(b, data, len);
    g_string_assign(b->ops, "(input)");
    rng_seed(input_hash(data, len), 0);
    run_case(s, b);
}

#ifdef ADD_COW_LIBFUZZER

/* ---- libFuzzer entry points ----------------------------------------- */

#include "fuzz-add-cow.h"

static Seed *context;
static Buf input;
static int fds_at_start;

static void print_outcomes_at_exit(void)
{
    print_outcomes();
    printf("%" PRIu64 " executions, %" PRIu64 " opened ok, %" PRIu64
           " rejected\n", st.execs, st.opened, st.rejected);
}

/* Work directory: $ADD_COW_FUZZ_DIR, or a new one in $TMPDIR */
int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    const char *dir = g_getenv("ADD_COW_FUZZ_DIR");
    g_autoptr(GError) err = NULL;

    module_call_init(MODULE_INIT_QOM);
    bdrv_init();
    qemu_init_main_loop(&error_abort);
    /* libFuzzer's -timeout uses SIGALRM, and it reports crashes itself */
    opt_timeout = 0;

    if (dir) {
        if (g_mkdir_with_parents(dir, 0755) < 0) {
            die("cannot create %s: %s", dir, strerror(errno));
        }
        opt_dir = dir;
    } else {
        opt_dir = g_dir_make_tmp("fuzz-add-cow-XXXXXX", &err);
        if (!opt_dir) {
            die("cannot create a work directory: %s", err->message);
        }
    }
    io_buf = qemu_memalign(4096, IO_BUF_SIZE);
    input.ops = g_string_new("");
    context = input_context();
    fds_at_start = count_fds();
    atexit(print_outcomes_at_exit);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    run_input(context, &input, data, size);
    if ((st.execs & 1023) == 0) {
        int fds = count_fds();

        if (fds_at_start >= 0 && fds > fds_at_start + 32) {
            die("file descriptors leak: %d open, %d at start", fds,
                fds_at_start);
        }
    }
    return 0;
}

/*
 * A consistent geometry: cluster_bits in [9, 21], a virtual size that is a
 * multiple of 512, and the bitmap_size and file length that go with them
 * (at most @max_len bytes), the bitmap left, random, or all set with the
 * all-allocated bit.  Such headers pass validation, so the execution
 * reaches the I/O paths with a geometry that no seed has.
 */
static void mut_valid_geometry(Buf *b, size_t max_len)
{
    static const uint64_t sizes[] = {
        0, 512, 65536, 66048, 1 << 20, (1 << 20) + 512, 64 << 20,
        (64 << 20) + 512, 1ULL << 30, 1ULL << 40,
    };
    uint64_t off = get_field(b, &fields[F_BITMAP_OFFSET]);
    uint64_t cb = 9 + rnd_below(13);
    uint64_t vs, nb, size;

    if (off >= max_len) {
        return;
    }
    vs = rnd_below(2) ? sizes[rnd_below(ARRAY_SIZE(sizes))]
                      : QEMU_ALIGN_DOWN(rnd_below(16 << 20), 512);
    for (;;) {
        nb = (vs >> cb) + !!(vs & ((1ULL << cb) - 1));
        size = ROUND_UP(DIV_ROUND_UP(nb, 8), 512);
        if (off + size <= max_len) {
            break;
        }
        if (cb < 21) {
            cb++;
        } else {
            vs = 1 << 20;
        }
    }
    set_field(b, &fields[F_CLUSTER_BITS], cb);
    set_field(b, &fields[F_VIRTUAL_SIZE], vs);
    set_field(b, &fields[F_BITMAP_SIZE], size);
    buf_resize(b, off + size);
    switch (rnd_below(3)) {
    case 0:
        break;
    case 1:
        for (uint64_t i = off; i < off + size; i++) {
            b->p[i] = rnd();
        }
        break;
    default:
        memset(b->p + off, 0xff, size);
        set_field(b, &fields[F_AUTOCLEAR],
                  get_field(b, &fields[F_AUTOCLEAR]) | 1);
        break;
    }
    g_string_append_printf(b->ops, "geometry cb=%" PRIu64 " vs=0x%" PRIx64
                           " ", cb, vs);
}

/* libFuzzer's mutations inside the name area or the bitmap only */
static size_t mutate_region(uint8_t *data, size_t size)
{
    uint64_t off, len;

    if (size < HDR_SIZE) {
        return 0;
    }
    if (rnd_below(2)) {
        off = HDR_SIZE;
        len = (uint32_t)ldl_le_p(data + 4);
    } else {
        off = ldq_le_p(data + 48);
        len = ldq_le_p(data + 56);
    }
    if (off >= size) {
        return 0;
    }
    len = MIN(len, size - off);
    if (len) {
        LLVMFuzzerMutate(data + off, len, len);
    }
    return size;
}

/*
 * A quarter of the mutations are libFuzzer's own (bytes, crossover with
 * other inputs, the dictionary), a quarter are libFuzzer's restricted to
 * the name area or the bitmap, which keeps the fixed header intact, a
 * quarter are the format-aware ones of the standalone mode, and a quarter
 * give the image a new valid geometry.  The last three get past header
 * validation far more often than byte mutations.
 */
size_t LLVMFuzzerCustomMutator(uint8_t *data, size_t size, size_t max_size,
                               unsigned int seed)
{
    static Buf b;
    unsigned kind;
    size_t len = 0;

    rng_seed(seed, size);
    kind = rnd_below(4);
    if (kind == 1) {
        len = mutate_region(data, size);
        kind = len ? 1 : 0;
    }
    if (kind == 0) {
        return LLVMFuzzerMutate(data, size, max_size);
    } else if (kind == 1) {
        return len;
    }
    if (!b.ops) {
        b.ops = g_string_new("");
    }
    buf_set(&b, data, size);
    if (kind == 2) {
        mutate(&b);
    } else {
        g_string_truncate(b.ops, 0);
        mut_valid_geometry(&b, max_size);
    }
    len = MIN(b.len, max_size);
    if (len) {
        memcpy(data, b.p, len);
    }
    return len;
}

#else

/* ---- standalone: generated seeds, watchdog, options ----------------- */

static const char *opt_corpus;
static uint64_t opt_seed = 1;
static uint64_t opt_iterations;
static uint64_t opt_first;
static double opt_duration;
static double opt_progress = 10;
static bool opt_replay;

static GPtrArray *seeds;

static void death_handler(int sig)
{
    /* Only async-signal-safe calls; the message was formatted earlier */
    if (sig == SIGALRM) {
        static const char hang[] = "fuzz-add-cow: FAILURE: hang "
            "(watchdog expired)\n";
        if (write(2, hang, sizeof(hang) - 1) < 0) {
            /* nothing to do */
        }
    }
    if (write(2, death_msg, death_msg_len) < 0) {
        /* nothing to do */
    }
    if (sig == SIGALRM) {
        signal(SIGABRT, SIG_DFL);
        abort();
    }
}

static void install_handlers(void)
{
    static const int fatal[] = { SIGSEGV, SIGBUS, SIGFPE, SIGILL };
    struct sigaction sa = {
        .sa_handler = death_handler,
        .sa_flags = SA_RESETHAND | SA_NODEFER,
    };

    sigaction(SIGABRT, &sa, NULL);
    sigaction(SIGALRM, &sa, NULL);
    for (int i = 0; i < ARRAY_SIZE(fatal); i++) {
        struct sigaction old;

        /* Keep a sanitizer's handler: it reports, then aborts */
        sigaction(fatal[i], NULL, &old);
        if (old.sa_handler == SIG_DFL) {
            sigaction(fatal[i], &sa, NULL);
        }
    }
}

static long rss_kib(void)
{
    g_autofree char *s = NULL;
    long pages = 0, rss = 0;

    if (!g_file_get_contents("/proc/self/statm", &s, NULL, NULL) ||
        sscanf(s, "%ld %ld", &pages, &rss) != 2) {
        return -1;
    }
    return rss * (qemu_real_host_page_size() / 1024);
}

static double now(void)
{
    return g_get_monotonic_time() / 1e6;
}



static void make_seeds(void)
{
    for (unsigned cb = 9; cb <= 21; cb++) {
        g_ptr_array_add(seeds, make_seed(cb, 'n'));
        g_ptr_array_add(seeds, make_seed(cb, 'b'));
    }
    g_ptr_array_add(seeds, make_seed(9, 'f'));
    g_ptr_array_add(seeds, make_seed(12, 'f'));
    g_ptr_array_add(seeds, make_seed(16, 'f'));
    g_ptr_array_add(seeds, make_seed(21, 'f'));
}

/*
 * --corpus DIR: each .add-cow file of DIR is a seed; every file of DIR is
 * copied next to it into its own directory, so that names in its header
 * resolve as in DIR.
 */
static void load_corpus(void)
{
    g_autoptr(GPtrArray) names = g_ptr_array_new_with_free_func(g_free);
    GDir *d;
    const char *n;

    d = g_dir_open(opt_corpus, 0, NULL);
    if (!d) {
        die("cannot read the corpus directory %s", opt_corpus);
    }
    while ((n = g_dir_read_name(d))) {
        g_autofree char *p = g_build_filename(opt_corpus, n, NULL);

        if (g_file_test(p, G_FILE_TEST_IS_REGULAR)) {
            g_ptr_array_add(names, g_strdup(n));
        }
    }
    g_dir_close(d);
    g_ptr_array_sort(names, (GCompareFunc)g_strcmp0);

    for (guint i = 0; i < names->len; i++) {
        const char *sname = g_ptr_array_index(names, i);
        g_autofree char *sub = NULL;
        g_autofree char *dir = NULL;
        gsize len;
        Seed *s;

        if (!g_str_has_suffix(sname, ".add-cow")) {
            continue;
        }
        sub = g_strdup_printf("corpus-%u", i);
        dir = g_build_filename(opt_dir, sub, NULL);
        g_mkdir_with_parents(dir, 0755);
        s = seed_new(dir, sname);
        for (guint j = 0; j < names->len; j++) {
            const char *fname = g_ptr_array_index(names, j);
            g_autofree char *from = g_build_filename(opt_corpus, fname, NULL);
            g_autofree char *to = g_build_filename(dir, fname, NULL);
            g_autofree char *content = NULL;

            if (!g_file_get_contents(from, &content, &len, NULL)) {
                die("cannot read %s", from);
            }
            write_file(to, content, len);
            if (i == j) {
                s->seed_path = g_strdup(to);
                s->data = (uint8_t *)g_steal_pointer(&content);
                s->len = len;
            } else {
                seed_add_file(s, to);
            }
        }
        g_ptr_array_add(seeds, s);
    }
    if (!seeds->len) {
        die("no .add-cow file in %s", opt_corpus);
    }
}

/* Fixed regressions: the image file is the .add-cow file itself */
static void regression(Buf *b, const Seed *s, const char *fmt)
{
    static const char name[] = "case.add-cow";

    b->len = 0;
    buf_resize(b, MAX(s->len, 2048 + sizeof(name)));
    memcpy(b->p, s->data, s->len);
    memcpy(b->p + 2048, name, sizeof(name) - 1);
    set_field(b, &fields[F_IMAGE_NAME_OFFSET], 2048);
    set_field(b, &fields[F_IMAGE_NAME_SIZE], sizeof(name) - 1);
    memset(b->p + IMAGE_FORMAT_OFF, 0, FMT_SIZE);
    memcpy(b->p + IMAGE_FORMAT_OFF, fmt, strlen(fmt));
    g_string_printf(b->ops, "regression: image file = itself as %s", fmt);
}

static void set_death_msg(uint64_t iteration, const Seed *s, const Buf *b)
{
    int n = snprintf(death_msg, sizeof(death_msg),
                     "fuzz-add-cow: died in execution %" PRIu64
                     " (seed %" PRIu64 ", corpus image %s): %s\n"
                     "fuzz-add-cow: input saved as %s (run next to %s); "
                     "replay: --dir DIR --seed %" PRIu64 " --first %" PRIu64
                     " --iterations 1\n",
                     iteration, opt_seed, s->desc, b->ops->str,
                     last_input_path, s->dir, opt_seed, iteration);

    death_msg_len = MIN(n, sizeof(death_msg) - 1);
}

static void print_stats(const char *prefix, double elapsed)
{
    printf("%s%" PRIu64 " executions, %" PRIu64 " opened ok, %" PRIu64
           " rejected, in %.0f s (%.0f/s)\n", prefix, st.execs, st.opened,
           st.rejected, elapsed, st.execs / MAX(elapsed, 0.001));
}

static void usage(void)
{
    printf("Usage: fuzz-add-cow --dir DIR [options]\n"
           "       fuzz-add-cow --dir DIR --replay FILE|DIR...\n"
           "  --dir DIR         work directory (seeds and scratch files)\n"
           "  --corpus DIR      seeds: the .add-cow files of DIR (with the\n"
           "                    files beside them) instead of generated ones\n"
           "  --seed N          PRNG seed (default 1)\n"
           "  --iterations N    executions (default: unlimited)\n"
           "  --duration S      stop after S seconds\n"
           "  --first N         start at execution N (replay)\n"
           "  --progress S      progress line every S seconds (0: none)\n"
           "  --timeout S       watchdog per execution (default 60)\n"
           "  --flush           real flushes (default: cache.no-flush)\n"
           "  --replay          run each input file (each file of each\n"
           "                    directory) once, unmutated, as the libFuzzer\n"
           "                    build does\n"
           "  --verbose         print every case and error\n");
}

static void replay_file(const Seed *s, Buf *b, const char *path)
{
    g_autofree uint8_t *data = NULL;
    gsize len;
    int n;

    if (!g_file_get_contents(path, (char **)&data, &len, NULL)) {
        die("cannot read %s", path);
    }
    n = snprintf(death_msg, sizeof(death_msg),
                 "fuzz-add-cow: died on input %s\n", path);
    death_msg_len = MIN(n, sizeof(death_msg) - 1);
    if (opt_verbose) {
        fprintf(stderr, "input %s\n", path);
    }
    run_input(s, b, data, len);
}

static void replay(const Seed *s, Buf *b, const char *path)
{
    g_autoptr(GPtrArray) names = NULL;
    const char *n;
    GDir *d;

    if (!g_file_test(path, G_FILE_TEST_IS_DIR)) {
        replay_file(s, b, path);
        return;
    }
    d = g_dir_open(path, 0, NULL);
    if (!d) {
        die("cannot read the directory %s", path);
    }
    names = g_ptr_array_new_with_free_func(g_free);
    while ((n = g_dir_read_name(d))) {
        g_ptr_array_add(names, g_build_filename(path, n, NULL));
    }
    g_dir_close(d);
    g_ptr_array_sort(names, (GCompareFunc)g_strcmp0);
    for (guint i = 0; i < names->len; i++) {
        const char *p = g_ptr_array_index(names, i);

        if (g_file_test(p, G_FILE_TEST_IS_REGULAR)) {
            replay_file(s, b, p);
        }
    }
}

/* The fixed regressions, then random cases from the seeds */
static void fuzz(Buf *b, double start)
{
    double last_progress = start;
    int fds0 = count_fds();

    if (opt_first == 0) {
        const char *const fmts[] = { "add-cow", "raw" };

        for (int i = 0; i < 4; i++) {
            const Seed *s = g_ptr_array_index(seeds, i / 2 % seeds->len);

            rng_seed(opt_seed, UINT64_MAX - i);
            regression(b, s, fmts[i % 2]);
            set_death_msg(0, s, b);
            run_case(s, b);
        }
    }

    for (uint64_t it = opt_first;
         !opt_iterations || it < opt_first + opt_iterations; it++) {
        const Seed *s;

        rng_seed(opt_seed, it);
        s = g_ptr_array_index(seeds, rnd_below(seeds->len));
        g_string_assign(b->ops, "(while mutating)");
        set_death_msg(it, s, b);
        buf_set(b, s->data, s->len);
        mutate(b);
        set_death_msg(it, s, b);
        if (opt_verbose) {
            fprintf(stderr, "execution %" PRIu64 " (%s): %s\n", it, s->desc,
                    b->ops->str);
        }
        run_case(s, b);

        if ((it & 63) == 0) {
            double t = now();

            if (opt_duration && t - start >= opt_duration) {
                break;
            }
            if (opt_progress && t - last_progress >= opt_progress) {
                int fds = count_fds();
                g_autofree char *prefix = g_strdup_printf(
                    "progress: rss %ld KiB, %d fds: ", rss_kib(), fds);

                print_stats(prefix, t - start);
                fflush(stdout);
                last_progress = t;
                if (fds0 >= 0 && fds > fds0 + 32) {
                    die("file descriptors leak: %d open, %d at start", fds,
                        fds0);
                }
            }
        }
    }
}

int main(int argc, char **argv)
{
    static const struct option longopts[] = {
        { "dir", required_argument, NULL, 'd' },
        { "corpus", required_argument, NULL, 'c' },
        { "seed", required_argument, NULL, 's' },
        { "iterations", required_argument, NULL, 'n' },
        { "duration", required_argument, NULL, 't' },
        { "first", required_argument, NULL, 'f' },
        { "progress", required_argument, NULL, 'p' },
        { "timeout", required_argument, NULL, 'T' },
        { "flush", no_argument, NULL, 'F' },
        { "replay", no_argument, NULL, 'r' },
        { "verbose", no_argument, NULL, 'v' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    Buf b = { .ops = g_string_new("") };
    double start;
    int c;

    while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (c) {
        case 'd':
            opt_dir = optarg;
            break;
        case 'c':
            opt_corpus = optarg;
            break;
        case 's':
            opt_seed = g_ascii_strtoull(optarg, NULL, 0);
            break;
        case 'n':
            opt_iterations = g_ascii_strtoull(optarg, NULL, 0);
            break;
        case 't':
            opt_duration = g_ascii_strtod(optarg, NULL);
            break;
        case 'f':
            opt_first = g_ascii_strtoull(optarg, NULL, 0);
            break;
        case 'p':
            opt_progress = g_ascii_strtod(optarg, NULL);
            break;
        case 'T':
            opt_timeout = atoi(optarg);
            break;
        case 'F':
            opt_flush = true;
            break;
        case 'r':
            opt_replay = true;
            break;
        case 'v':
            opt_verbose = true;
            break;
        case 'h':
            usage();
            return 0;
        default:
            usage();
            return 2;
        }
    }
    if (!opt_dir || (optind != argc) != opt_replay) {
        usage();
        return 2;
    }

    module_call_init(MODULE_INIT_QOM);
    bdrv_init();
    qemu_init_main_loop(&error_abort);
    install_handlers();

    if (g_mkdir_with_parents(opt_dir, 0755) < 0) {
        die("cannot create %s: %s", opt_dir, strerror(errno));
    }
    io_buf = qemu_memalign(4096, IO_BUF_SIZE);
    seeds = g_ptr_array_new();
    if (opt_replay) {
        g_ptr_array_add(seeds, input_context());
    } else {
        last_input_path = g_build_filename(opt_dir, "last-input.add-cow",
                                           NULL);
        if (opt_corpus) {
            load_corpus();
        } else {
            make_seeds();
        }
        printf("Seed corpus: %u images\n", seeds->len);
        fflush(stdout);
    }

    start = now();
    if (opt_replay) {
        for (int i = optind; i < argc; i++) {
            replay(g_ptr_array_index(seeds, 0), &b, argv[i]);
        }
    } else {
        fuzz(&b, start);
    }

    print_outcomes();
    print_stats("", now() - start);

    for (guint i = 0; i < seeds->len; i++) {
        Seed *s = g_ptr_array_index(seeds, i);

        unlink(s->case_path);
        for (guint j = 0; j < s->files->len; j++) {
            g_free(g_array_index(s->files, SeedFile, j).path);
        }
        g_array_free(s->files, true);
        g_free(s->desc);
        g_free(s->dir);
        g_free(s->seed_path);
        g_free(s->case_path);
        g_free(s->data);
        g_free(s);
    }
    g_ptr_array_free(seeds, true);
    if (last_input_path) {
        unlink(last_input_path);
        g_free(last_input_path);
    }
    qemu_vfree(io_buf);
    g_free(b.p);
    g_string_free(b.ops, true);
    return 0;
}

#endif
