/* Instance segmentation metrics as in the CellSAM paper evaluation
 * (paper_evaluation/cpm.py + cellpose metrics): optimal IoU matching of ground
 * truth and predicted instances, F1 / precision / recall at one IoU threshold,
 * and AP (TP / (TP + FP + FN), Cellpose/StarDist sense) at IoU 0.50:0.05:0.95.
 *
 * Conventions:
 * - Label 0 is background; every other value is one instance. Label values need
 *   not be sequential (they are renumbered internally; ids with gaps are fine).
 * - Matching per threshold t: linear sum assignment on
 *   cost = -[IoU >= t] - IoU / (2 min(n_gt, n_pred)); TP = matched pairs with
 *   IoU >= t; FP = n_pred - TP; FN = n_gt - TP.
 * - Every 0/0 ratio is reported as 0 (the paper maps NaN to 0). In particular an
 *   image with no GT and no predicted instance gets F1 = precision = recall =
 *   AP = 0, exactly like the paper's per-image F1 that enters its mean.
 * - AP threshold k (k = 0..9) is (10 + k) / 20 as a double; IoU is computed as
 *   intersection / union in double, so "IoU >= t" is decided exactly (an IoU of
 *   exactly 0.5 passes the 0.5 threshold).
 */
#ifndef CELLSAM_METRICS_H
#define CELLSAM_METRICS_H

#include <stddef.h>
#include <stdint.h>

#define CS_AP_THRESHOLDS 10
/* Largest image the metric accepts (pixels); keeps ids and counts in 32 bits. */
#define CS_METRICS_MAX_PIXELS ((size_t)1 << 30)

typedef struct {
    int n_gt, n_pred; /* number of distinct non-zero labels */
    int tp, fp, fn;   /* at the evaluation threshold (0.5 by default) */
    double f1, precision, recall;
    double ap[CS_AP_THRESHOLDS]; /* ap[k] at IoU threshold cs_ap_threshold(k) */
    double mean_ap;              /* mean of ap[0..9] */
} cs_match_stats;

/* IoU threshold of ap[k]: 0.5 + 0.05 k, computed as (10 + k) / 20.0. */
double cs_ap_threshold(int k);

/* Score a predicted label image against a ground-truth one of the same size
 * (n_pixels values each, any layout as long as both agree). tp/fp/fn, f1,
 * precision and recall are at IoU 0.5. Returns CELLSAM_OK or an error code. */
int cs_evaluate_labels(const uint32_t *gt, const uint32_t *pred, size_t n_pixels, cs_match_stats *out);

/* As cs_evaluate_labels, with tp/fp/fn/f1/precision/recall at IoU threshold
 * iou_threshold (0 < t <= 1). The ap[] values always use the fixed thresholds. */
int cs_evaluate_labels_at(const uint32_t *gt, const uint32_t *pred, size_t n_pixels,
                          double iou_threshold, cs_match_stats *out);

/* Exact rectangular linear sum assignment (scipy.optimize.linear_sum_assignment
 * semantics): choose k = min(n_rows, n_cols) (row, column) pairs, no row or column
 * used twice, minimizing the sum of cost[row * n_cols + col]. Costs must be finite.
 * row_ind and col_ind receive k entries each, row_ind increasing. Shortest
 * augmenting paths with potentials (Jonker-Volgenant / Crouse), O(k^2 max(n_rows, n_cols) log).
 * n_rows * n_cols is capped at 2^26. */
int cs_linear_sum_assignment(const double *cost, int n_rows, int n_cols, int *row_ind, int *col_ind);

#endif
