/* The seam between model loading and the CellFinder head (src/cellfinder.c). */
#ifndef CELLSAM_CELLFINDER_API_H
#define CELLSAM_CELLFINDER_API_H

#include "model.h"

/* Bind the detector head under the binder's current prefix. */
int cs_cellfinder_bind_model(struct cs_cellfinder **out, cs_binder *b, int backbone_dim, int n_heads);
void cs_cellfinder_release(struct cs_cellfinder *cf);
/* Hyper-parameters for cellsam_model_info (zeros when cf is NULL). */
void cs_cellfinder_info(const struct cs_cellfinder *cf, int *queries, int *enc_layers, int *dec_layers,
                        int *heads);

#endif
