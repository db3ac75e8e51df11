/* CellFinder detector head (spec §4.5): Anchor-DETR with row-column decoupled
 * attention (RCDA) on the ViT trunk output, its PostProcess (sigmoid + top-k over
 * query x class), and the dynamic score threshold of CellSAM.predict (§3.4 step 2),
 * which reproduces scikit-learn 1.2.1 KMeans(n_clusters=2, random_state=42). */
#ifndef CELLSAM_CELLFINDER_H
#define CELLSAM_CELLFINDER_H

#include <stdint.h>

#include "model.h"

/* ------------------------------------------------------------------ head */

/* Bind every head tensor under the binder's prefix (the caller sets
 * "cellfinder.decode_head."). Layer counts, queries and FFN width come from the
 * tensor shapes; d_model must be 256 (the positional encodings hard-code it).
 * Returns CELLSAM_ERR_MODEL when tensors are missing or mis-shaped (listed in
 * b->problems), CELLSAM_ERR_INVALID for bad arguments. */
int cs_cellfinder_bind(struct cs_cellfinder **out, cs_binder *b, int backbone_dim, int n_heads);
void cs_cellfinder_free(struct cs_cellfinder *cf);

typedef struct {
    int backbone_dim; /* E: trunk channels */
    int d_model;      /* 256 */
    int n_heads;
    int enc_layers, dec_layers;
    int ffn_dim;
    int n_queries;    /* Q = positions x patterns */
    int n_classes;    /* 2 */
    int grid;         /* 64: feature map side */
} cs_cellfinder_dims;
void cs_cellfinder_get_dims(const struct cs_cellfinder *cf, cs_cellfinder_dims *d);
/* Opt-in: the head's matrix products take bfloat16 inputs with float32 sums
 * (gemm_bf16.c): the projections (packed here, once), the self-attention's q k^T and
 * p v, and RCDA's a_c v. Softmax, norms, the input projection and the class/box
 * outputs stay float32. Call at model load, before the head is shared by threads.
 * Returns CELLSAM_OK or CELLSAM_ERR_NOMEM (the head then stays float32). */
int cs_cellfinder_set_compute_bf16(struct cs_cellfinder *cf, int on);

/* features_chw: trunk output (E, 64, 64). Outputs of the last decoder layer:
 * logits (Q,2) and boxes (Q,4) as normalised (cx,cy,w,h). aux_logits_all (L,Q,2)
 * and aux_boxes_all (L,Q,4), one slice per decoder layer, may be NULL. */
int cs_cellfinder_forward(const struct cs_cellfinder *cf, const float *features_chw, float *logits,
                          float *boxes, float *aux_logits_all, float *aux_boxes_all, int n_threads);

/* Optional intermediates for tests; each pointer may be NULL. Both are channel-first
 * (256, 64, 64): input_proj = GroupNorm(Conv1x1(F)), memory = encoder output. */
typedef struct {
    float *input_proj_chw;
    float *memory_chw;
} cs_cellfinder_debug;
int cs_cellfinder_forward_debug(const struct cs_cellfinder *cf, const float *features_chw,
                                float *logits, float *boxes, float *aux_logits_all,
                                float *aux_boxes_all, const cs_cellfinder_debug *dbg, int n_threads);

/* PostProcess with target size 1024x1024: prob = sigmoid(logits) flattened
 * query-major (Q*2), the Q largest in descending order (ties: lower flat index
 * first, NaN first, as a stable descending argsort), query = flat index / 2,
 * boxes (x1,y1,x2,y2) * 1024 of that query. Outputs hold Q, Q and Q*4 values. */
int cs_cellfinder_postprocess(const float *logits, const float *boxes, int Q, float *scores_sorted,
                              int *query_index, float *boxes_xyxy_1024);

/* ------------------------------------------------------- dynamic threshold */

/* numpy's legacy RandomState (MT19937), as scikit-learn's check_random_state(int). */
typedef struct {
    uint32_t mt[624];
    int pos;
} cs_np_random_state;
void cs_np_random_seed(cs_np_random_state *rs, uint32_t seed);
uint32_t cs_np_random_uint32(cs_np_random_state *rs);
double cs_np_random_sample(cs_np_random_state *rs); /* 53-bit double in [0,1) */
int64_t cs_np_random_randint(cs_np_random_state *rs, int64_t high); /* [0, high), masked rejection */

typedef struct {
    float centers[2]; /* cluster_centers_ in label order (float32, as sklearn keeps them) */
    int n_iter;       /* n_iter_ of the best run */
    double inertia;
} cs_kmeans2_result;

/* KMeans(n_clusters=2, random_state=42, n_init=10, init='k-means++', Lloyd,
 * max_iter=300, tol=1e-4) of scikit-learn 1.2.1 on the 1-D float32 data x, with
 * its float32 arithmetic and summation orders. `emulated_threads` is the OpenMP
 * thread count whose per-thread partial sums the Lloyd update reproduces (results
 * differ in the last bit between thread counts; the reference used 2).
 * Returns CELLSAM_ERR_INVALID where sklearn raises (n < 2, non-finite data). */
int cs_kmeans2_sklearn(const float *x, int n, int emulated_threads, cs_kmeans2_result *res);

/* Exact 1-D two-means optimum (minimum within-cluster sum of squares over all
 * splits of the sorted data), centres in float64, lower centre first. */
int cs_kmeans2_exact_1d(const float *x, int n, double centers[2]);

typedef struct {
    double threshold;      /* 0.66*bbox_threshold + 0.33*mean(centers), float64 */
    float threshold_f32;   /* the value scores are compared with (strict >) */
    int used_kmeans;       /* 0: KMeans would raise, threshold = bbox_threshold */
    cs_kmeans2_result km;
    int n_kept;
} cs_dynamic_threshold_info;

/* The dynamic threshold of CellSAM.predict on the top-k scores (descending).
 * bbox_threshold is the Python float (0.4). keep (n bytes, may be NULL) gets
 * 1 where score > threshold. */
int cs_dynamic_threshold_ex(const float *scores_sorted, int n, double bbox_threshold,
                            cs_dynamic_threshold_info *info, unsigned char *keep);
/* Same with a float bbox_threshold: it is read back as the shortest decimal that
 * rounds to it (0.4f -> 0.4), i.e. the Python literal a user would have typed. */
int cs_dynamic_threshold(const float *scores_sorted, int n, float bbox_threshold, float *threshold,
                         unsigned char *keep);

#endif
