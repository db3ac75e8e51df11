/* make_slide OUT.tif WIDTH HEIGHT [--tile N] [--pitch PX] [--seed N]
 *
 * Writes a synthetic whole-slide image for the bounded-memory benchmark: one 16-bit
 * channel, tiled (default 512 x 512) and deflate-compressed, with nucleus-like
 * ellipses on a jittered grid (pitch 32 px by default) over a dim, noisy background.
 * Tiles are generated one at a time from a hash of their position, so slides far
 * larger than memory (20000 x 20000 and up) are written in a few MB of RAM.
 * Cells are a function of the grid cell, so an image of any size has the same
 * density and every tile the same amount of work. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <tiffio.h>

static uint32_t hash32(uint32_t a, uint32_t b, uint32_t c) {
    uint32_t h = a * 0x9E3779B1u ^ (b + 0x7F4A7C15u) * 0x85EBCA77u ^ (c + 0x165667B1u) * 0xC2B2AE3Du;
    h ^= h >> 15;
    h *= 0x2C1B3C6Du;
    h ^= h >> 12;
    h *= 0x297A2D39u;
    h ^= h >> 15;
    return h;
}

static float unit(uint32_t h) { return (float)(h & 0xFFFFFF) / 16777216.0f; }

/* Brightest nucleus value over the (up to) 9 grid cells whose cell can reach (x, y). */
static float pixel(int x, int y, int pitch, uint32_t seed) {
    const int gx = x / pitch, gy = y / pitch;
    float v = 300.0f + 40.0f * unit(hash32((uint32_t)x, (uint32_t)y, seed ^ 0xABCDu));
    for (int dy = -1; dy <= 1; dy++)
        for (int dx = -1; dx <= 1; dx++) {
            const int cx = gx + dx, cy = gy + dy;
            if (cx < 0 || cy < 0) continue;
            const uint32_t h = hash32((uint32_t)cx, (uint32_t)cy, seed);
            if ((h & 7) == 0) continue; /* one grid cell in 8 is empty */
            const float px = ((float)cx + 0.25f + 0.5f * unit(h)) * (float)pitch;
            const float py = ((float)cy + 0.25f + 0.5f * unit(h >> 7)) * (float)pitch;
            const float rx = 0.18f * (float)pitch + 0.12f * (float)pitch * unit(h >> 13);
            const float ry = 0.18f * (float)pitch + 0.12f * (float)pitch * unit(h >> 19);
            const float ex = ((float)x - px) / rx, ey = ((float)y - py) / ry;
            const float d2 = ex * ex + ey * ey;
            if (d2 < 1.0f) {
                const float b = 1800.0f + 1800.0f * unit(h >> 3);
                const float val = 300.0f + b * (1.0f - 0.35f * d2);
                v = val > v ? val : v;
            }
        }
    return v;
}

static int parse_positive(const char *s, long max, long *out) {
    char *end;
    long v = strtol(s, &end, 10);
    if (*s == '\0' || *end != '\0' || v < 1 || v > max) return -1;
    *out = v;
    return 0;
}

int main(int argc, char **argv) {
    long tile = 512, pitch = 32, seed = 1, w = 0, h = 0;
    const char *out = NULL;
    int npos = 0;
    for (int i = 1; i < argc; i++) {
        long *opt = !strcmp(argv[i], "--tile") ? &tile : !strcmp(argv[i], "--pitch") ? &pitch
                                               : !strcmp(argv[i], "--seed")  ? &seed
                                                                             : NULL;
        if (opt) {
            if (i + 1 >= argc || parse_positive(argv[++i], 1L << 20, opt)) {
                fprintf(stderr, "make_slide: %s needs a positive number\n", argv[i - 1]);
                return 2;
            }
        } else if (npos == 0) {
            out = argv[i];
            npos++;
        } else if (npos < 3) {
            if (parse_positive(argv[i], 200000, npos == 1 ? &w : &h)) {
                fprintf(stderr, "make_slide: width and height must be 1..200000\n");
                return 2;
            }
            npos++;
        } else {
            fprintf(stderr, "make_slide: unexpected argument '%s'\n", argv[i]);
            return 2;
        }
    }
    if (npos != 3 || tile % 16 || pitch < 8) {
        fprintf(stderr, "usage: make_slide OUT.tif WIDTH HEIGHT [--tile N (multiple of 16)] [--pitch PX >= 8] [--seed N]\n");
        return 2;
    }
    /* BigTIFF once the raw pixels pass 2 GB */
    const int big = (double)w * (double)h * 2.0 > 2e9;
    TIFF *tif = TIFFOpen(out, big ? "w8" : "w");
    if (!tif) {
        fprintf(stderr, "make_slide: cannot create %s\n", out);
        return 1;
    }
    TIFFSetField(tif, TIFFTAG_IMAGEWIDTH, (uint32_t)w);
    TIFFSetField(tif, TIFFTAG_IMAGELENGTH, (uint32_t)h);
    TIFFSetField(tif, TIFFTAG_BITSPERSAMPLE, 16);
    TIFFSetField(tif, TIFFTAG_SAMPLESPERPIXEL, 1);
    TIFFSetField(tif, TIFFTAG_SAMPLEFORMAT, SAMPLEFORMAT_UINT);
    TIFFSetField(tif, TIFFTAG_PHOTOMETRIC, PHOTOMETRIC_MINISBLACK);
    TIFFSetField(tif, TIFFTAG_PLANARCONFIG, PLANARCONFIG_CONTIG);
    TIFFSetField(tif, TIFFTAG_COMPRESSION, COMPRESSION_ADOBE_DEFLATE);
    TIFFSetField(tif, TIFFTAG_TILEWIDTH, (uint32_t)tile);
    TIFFSetField(tif, TIFFTAG_TILELENGTH, (uint32_t)tile);
    uint16_t *buf = malloc((size_t)tile * (size_t)tile * sizeof(uint16_t));
    if (!buf) {
        TIFFClose(tif);
        return 1;
    }
    int rc = 0;
    for (long ty = 0; ty < h && !rc; ty += tile)
        for (long tx = 0; tx < w && !rc; tx += tile) {
            for (long y = 0; y < tile; y++)
                for (long x = 0; x < tile; x++) {
                    const long ix = tx + x, iy = ty + y;
                    buf[y * tile + x] =
                        ix < w && iy < h ? (uint16_t)pixel((int)ix, (int)iy, (int)pitch, (uint32_t)seed) : 0;
                }
            if (TIFFWriteTile(tif, buf, (uint32_t)tx, (uint32_t)ty, 0, 0) < 0) rc = 1;
        }
    free(buf);
    TIFFClose(tif);
    if (rc) {
        fprintf(stderr, "make_slide: writing %s failed\n", out);
        remove(out);
        return 1;
    }
    printf("%s: %ld x %ld, 16-bit, %ld px tiles\n", out, w, h, tile);
    return 0;
}
