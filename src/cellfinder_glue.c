/* Temporary glue until src/cellfinder.c lands: no detector head is bound. */
#include "cellfinder_api.h"
#include "common.h"

__attribute__((weak)) int cs_cellfinder_bind_model(struct cs_cellfinder **out, cs_binder *b, int backbone_dim,
                                                   int n_heads) {
    (void)b;
    (void)backbone_dim;
    (void)n_heads;
    *out = NULL;
    return CELLSAM_OK;
}
__attribute__((weak)) void cs_cellfinder_release(struct cs_cellfinder *cf) { (void)cf; }
__attribute__((weak)) void cs_cellfinder_info(const struct cs_cellfinder *cf, int *q, int *e, int *d, int *h) {
    (void)cf;
    *q = *e = *d = *h = 0;
}
