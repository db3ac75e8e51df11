/* Training losses (train.h "losses"): sigmoid focal, dice, MSE, box L1, GIoU and
 * the Anchor-DETR set loss with Hungarian matching.
 *
 * Every loss is evaluated in double over the float32 inputs, so the returned
 * value is smooth enough for finite-difference checks and large sums do not
 * lose precision. Returned values are the unscaled losses; `scale` only
 * multiplies the gradients that are written. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "metrics.h"
#include "train.h"

/* Added to unions and enclosing areas so that degenerate (zero-area) boxes give
 * a finite GIoU instead of 0/0. Tiny, because it biases 1 - GIoU of a perfect
 * match by eps / area and a 3-pixel cell in the 1024 frame has area ~1e-5. */
#define GIOU_EPS 1e-12

/* log(1 + exp(z)) without overflow. */
static inline double softplus(double z) { return z > 0 ? z + log1p(exp(-z)) : log1p(exp(z)); }

static inline double sigmoid_d(double z) {
    if (z >= 0) return 1.0 / (1.0 + exp(-z));
    double e = exp(z);
    return e / (1.0 + e);
}

/* ------------------------------------------------------------ focal loss */

/* torchvision's sigmoid_focal_loss for one element (soft targets allowed):
 * ce = BCE-with-logits, p_t = p t + (1-p)(1-t), loss = alpha_t ce (1-p_t)^gamma,
 * alpha_t = alpha t + (1-alpha)(1-t), no alpha weighting when alpha < 0.
 * Returns the loss; *dx receives its derivative w.r.t. x. */
static double focal_elem(double x, double t, double alpha, double gamma, double *dx) {
    double p = sigmoid_d(x);
    /* -t log p - (1-t) log(1-p) with log p = -softplus(-x), log(1-p) = -softplus(x). */
    double ce = t * softplus(-x) + (1.0 - t) * softplus(x);
    double m = p + t - 2.0 * p * t; /* 1 - p_t */
    if (m < 0) m = 0;
    double a_t = alpha >= 0 ? alpha * t + (1.0 - alpha) * (1.0 - t) : 1.0;
    double mg = gamma == 0 ? 1.0 : (gamma == 2 ? m * m : pow(m, gamma));
    if (dx) {
        /* d(m^gamma)/dm = gamma m^(gamma-1); at m = 0 take the limit 0 for gamma > 1
         * (gamma <= 1 at m = 0 needs ce = 0 there, i.e. a saturated hard target). */
        double dmg = 0;
        if (gamma != 0) {
            if (m > 0)
                dmg = gamma == 2 ? 2.0 * m : gamma * pow(m, gamma - 1.0);
            else if (gamma == 1)
                dmg = 1.0;
        }
        double dp = p * (1.0 - p);
        *dx = a_t * ((p - t) * mg + ce * dmg * (1.0 - 2.0 * t) * dp);
    }
    return a_t * ce * mg;
}

double cs_loss_sigmoid_focal(const float *x, const float *t, size_t n, float alpha, float gamma,
                             float scale, float *grad) {
    if (n == 0) return 0;
    if (!x || !t) {
        cs_error(CELLSAM_ERR_INVALID, "focal loss: NULL input");
        return NAN;
    }
    double sum = 0;
    for (size_t i = 0; i < n; i++) {
        double d;
        sum += focal_elem(x[i], t[i], alpha, gamma, grad ? &d : NULL);
        if (grad) grad[i] = (float)(scale * d);
    }
    return sum;
}

/* ------------------------------------------------------------------ dice */

double cs_loss_dice(const float *x, const float *t, size_t n, float scale, float *grad) {
    if (n > 0 && (!x || !t)) {
        cs_error(CELLSAM_ERR_INVALID, "dice loss: NULL input");
        return NAN;
    }
    double inter = 0, sum_p = 0, sum_t = 0;
    for (size_t i = 0; i < n; i++) {
        double p = sigmoid_d(x[i]);
        inter += p * t[i];
        sum_p += p;
        sum_t += t[i];
    }
    double num = 2.0 * inter + 1.0, den = sum_p + sum_t + 1.0;
    if (grad) {
        /* d/dp_i of -(num/den) = -(2 t_i den - num) / den^2, times sigmoid'. */
        double inv2 = 1.0 / (den * den);
        for (size_t i = 0; i < n; i++) {
            double p = sigmoid_d(x[i]);
            double dp = -(2.0 * t[i] * den - num) * inv2;
            grad[i] = (float)(scale * dp * p * (1.0 - p));
        }
    }
    return 1.0 - num / den;
}

/* ------------------------------------------------------------------- MSE */

double cs_loss_mse(const float *a, const float *b, size_t n, float scale, float *grad) {
    if (n > 0 && (!a || !b)) {
        cs_error(CELLSAM_ERR_INVALID, "mse loss: NULL input");
        return NAN;
    }
    double sum = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)a[i] - (double)b[i];
        sum += d * d;
        if (grad) grad[i] = (float)(scale * 2.0 * d);
    }
    return sum;
}

/* ----------------------------------------------------------------- boxes */

double cs_loss_box_l1(const float *pred, const float *target, float scale, float *grad) {
    if (!pred || !target) {
        cs_error(CELLSAM_ERR_INVALID, "box L1 loss: NULL input");
        return NAN;
    }
    double sum = 0;
    for (int k = 0; k < 4; k++) {
        double d = (double)pred[k] - (double)target[k];
        sum += fabs(d);
        /* sign(0) = 0, as torch's L1 gradient. */
        if (grad) grad[k] = (float)(d > 0 ? scale : d < 0 ? -scale : 0.0f);
    }
    return sum;
}

typedef struct {
    double x1, y1, x2, y2, area;
} box_xyxy;

/* Negative widths / heights are clamped to 0 (the box becomes a segment or a
 * point at its centre) so that no configuration yields NaN. */
static inline box_xyxy to_xyxy(double cx, double cy, double w, double h) {
    if (!(w > 0)) w = 0;
    if (!(h > 0)) h = 0;
    box_xyxy b = {cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h, w * h};
    return b;
}

/* GIoU of two xyxy boxes (no gradient): the matcher's inner loop. */
static inline double giou_value(const box_xyxy *a, const box_xyxy *b) {
    double iw = fmin(a->x2, b->x2) - fmax(a->x1, b->x1);
    double ih = fmin(a->y2, b->y2) - fmax(a->y1, b->y1);
    double inter = (iw > 0 ? iw : 0) * (ih > 0 ? ih : 0);
    double uni = a->area + b->area - inter + GIOU_EPS;
    double cw = fmax(a->x2, b->x2) - fmin(a->x1, b->x1);
    double ch = fmax(a->y2, b->y2) - fmin(a->y1, b->y1);
    double encl = (cw > 0 ? cw : 0) * (ch > 0 ? ch : 0) + GIOU_EPS;
    return inter / uni - (encl - uni) / encl;
}

/* GIoU of pred and target (cx,cy,w,h) and, when dpred != NULL, dGIoU/dpred
 * (cx,cy,w,h). Widths are clamped at 0 (a clamped side gets no gradient); at
 * ties of min/max the prediction takes the gradient (a subgradient choice). */
static double giou_grad(const double *pc, const double *tc, double *dpred) {
    box_xyxy a = to_xyxy(pc[0], pc[1], pc[2], pc[3]);
    box_xyxy b = to_xyxy(tc[0], tc[1], tc[2], tc[3]);
    double aw = a.x2 - a.x1, ah = a.y2 - a.y1;
    double awc = aw > 0 ? aw : 0, ahc = ah > 0 ? ah : 0;
    double ix1 = fmax(a.x1, b.x1), ix2 = fmin(a.x2, b.x2);
    double iy1 = fmax(a.y1, b.y1), iy2 = fmin(a.y2, b.y2);
    double iw = ix2 - ix1, ih = iy2 - iy1;
    double iwc = iw > 0 ? iw : 0, ihc = ih > 0 ? ih : 0;
    double inter = iwc * ihc;
    double uni = a.area + b.area - inter + GIOU_EPS;
    double cx1 = fmin(a.x1, b.x1), cx2 = fmax(a.x2, b.x2);
    double cy1 = fmin(a.y1, b.y1), cy2 = fmax(a.y2, b.y2);
    double cw = cx2 - cx1, ch = cy2 - cy1;
    double cwc = cw > 0 ? cw : 0, chc = ch > 0 ? ch : 0;
    double encl = cwc * chc + GIOU_EPS;
    double giou = inter / uni - (encl - uni) / encl;
    if (!dpred) return giou;

    /* Partial derivatives w.r.t. the prediction's x1, y1, x2, y2. */
    double dA[4] = {0, 0, 0, 0}, dI[4] = {0, 0, 0, 0}, dC[4] = {0, 0, 0, 0};
    if (aw > 0 && ah > 0) {
        dA[0] = -ahc;
        dA[2] = ahc;
        dA[1] = -awc;
        dA[3] = awc;
    }
    if (iw > 0 && ih > 0) {
        double dix1 = a.x1 >= b.x1 ? 1 : 0, dix2 = a.x2 <= b.x2 ? 1 : 0;
        double diy1 = a.y1 >= b.y1 ? 1 : 0, diy2 = a.y2 <= b.y2 ? 1 : 0;
        dI[0] = -dix1 * ihc;
        dI[2] = dix2 * ihc;
        dI[1] = -diy1 * iwc;
        dI[3] = diy2 * iwc;
    }
    if (cw > 0 && ch > 0) {
        double dcx1 = a.x1 <= b.x1 ? 1 : 0, dcx2 = a.x2 >= b.x2 ? 1 : 0;
        double dcy1 = a.y1 <= b.y1 ? 1 : 0, dcy2 = a.y2 >= b.y2 ? 1 : 0;
        dC[0] = -dcx1 * chc;
        dC[2] = dcx2 * chc;
        dC[1] = -dcy1 * cwc;
        dC[3] = dcy2 * cwc;
    }
    /* giou = I/U - 1 + U/C with U = A + B - I. */
    double dx[4];
    for (int k = 0; k < 4; k++) {
        double dU = dA[k] - dI[k];
        dx[k] = (dI[k] * uni - inter * dU) / (uni * uni) + dU / encl - uni * dC[k] / (encl * encl);
    }
    /* x1 = cx - w/2, x2 = cx + w/2 (same for y). */
    dpred[0] = dx[0] + dx[2];
    dpred[1] = dx[1] + dx[3];
    dpred[2] = pc[2] > 0 ? 0.5 * (dx[2] - dx[0]) : 0.0; /* clamped width: flat */
    dpred[3] = pc[3] > 0 ? 0.5 * (dx[3] - dx[1]) : 0.0;
    return giou;
}

double cs_loss_giou(const float *pred, const float *target, float scale, float *grad) {
    if (!pred || !target) {
        cs_error(CELLSAM_ERR_INVALID, "GIoU loss: NULL input");
        return NAN;
    }
    double pc[4], tc[4], d[4];
    for (int k = 0; k < 4; k++) {
        pc[k] = pred[k];
        tc[k] = target[k];
    }
    double giou = giou_grad(pc, tc, grad ? d : NULL);
    if (grad)
        for (int k = 0; k < 4; k++) grad[k] = (float)(-scale * d[k]);
    return 1.0 - giou;
}

/* ------------------------------------------------------- DETR set loss */

cs_detr_loss_params cs_detr_loss_default_params(void) {
    cs_detr_loss_params p;
    p.cost_class = 2;
    p.cost_bbox = 5;
    p.cost_giou = 2;
    p.loss_class = 2;
    p.loss_bbox = 5;
    p.loss_giou = 2;
    p.focal_alpha = 0.25f;
    p.focal_gamma = 2;
    p.target_class = 1;
    p.anchors = NULL;
    p.dense_center = 0;
    return p;
}

/* Queries and ground-truth boxes an image may have: the matcher's dense Q x G
 * cost matrix must stay within the assignment solver's 2^26 entries anyway. */
#define DETR_MAX_QUERIES (1 << 20)
#define DETR_MAX_GT (1 << 20)
#define DETR_MAX_CLASSES 4096

static int all_finite(const float *a, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!isfinite(a[i])) return 0;
    return 1;
}

static int check_detr_args(const float *logits, const float *boxes, int Q, int n_classes,
                           const float *gt_boxes, int G, const cs_detr_loss_params *p) {
    if (!logits || !boxes || !p)
        return cs_error(CELLSAM_ERR_INVALID, "DETR loss: NULL logits, boxes or params");
    if (Q <= 0 || Q > DETR_MAX_QUERIES)
        return cs_error(CELLSAM_ERR_INVALID, "DETR loss: query count %d outside 1..%d", Q, DETR_MAX_QUERIES);
    if (n_classes <= 0 || n_classes > DETR_MAX_CLASSES)
        return cs_error(CELLSAM_ERR_INVALID, "DETR loss: class count %d outside 1..%d", n_classes,
                        DETR_MAX_CLASSES);
    if (G < 0 || G > DETR_MAX_GT)
        return cs_error(CELLSAM_ERR_INVALID, "DETR loss: ground-truth count %d outside 0..%d", G, DETR_MAX_GT);
    if (G > 0 && !gt_boxes) return cs_error(CELLSAM_ERR_INVALID, "DETR loss: NULL ground-truth boxes");
    if (p->target_class < 0 || p->target_class >= n_classes)
        return cs_error(CELLSAM_ERR_INVALID, "DETR loss: target class %d outside 0..%d", p->target_class,
                        n_classes - 1);
    const float w[6] = {p->cost_class, p->cost_bbox, p->cost_giou, p->loss_class, p->loss_bbox, p->loss_giou};
    for (int k = 0; k < 6; k++)
        if (!isfinite(w[k])) return cs_error(CELLSAM_ERR_INVALID, "DETR loss: non-finite cost or loss weight");
    if (!isfinite(p->focal_alpha) || p->focal_alpha > 1)
        return cs_error(CELLSAM_ERR_INVALID, "DETR loss: focal alpha %g not <= 1", (double)p->focal_alpha);
    if (!isfinite(p->focal_gamma) || p->focal_gamma < 0)
        return cs_error(CELLSAM_ERR_INVALID, "DETR loss: focal gamma %g not >= 0", (double)p->focal_gamma);
    if (!(p->dense_center >= 0 && p->dense_center <= 1))
        return cs_error(CELLSAM_ERR_INVALID, "DETR loss: dense centre fraction %g outside 0..1",
                        (double)p->dense_center);
    if (p->dense_center > 0 && !p->anchors)
        return cs_error(CELLSAM_ERR_INVALID, "DETR loss: one-to-many targets need anchors");
    size_t n_logits;
    if (cs_mul_size((size_t)Q, (size_t)n_classes, &n_logits))
        return cs_error(CELLSAM_ERR_LIMIT, "DETR loss: %d x %d logits overflow", Q, n_classes);
    if (!all_finite(logits, n_logits)) return cs_error(CELLSAM_ERR_INVALID, "DETR loss: non-finite logit");
    if (!all_finite(boxes, (size_t)Q * 4)) return cs_error(CELLSAM_ERR_INVALID, "DETR loss: non-finite box");
    if (G > 0 && !all_finite(gt_boxes, (size_t)G * 4))
        return cs_error(CELLSAM_ERR_INVALID, "DETR loss: non-finite ground-truth box");
    return CELLSAM_OK;
}

/* Hungarian matching with the Deformable/Anchor-DETR matcher cost
 * cost_class * (pos - neg) + cost_bbox * L1 - cost_giou * GIoU, rows = queries,
 * columns = ground truth. match[g] = query or -1 (only when G > Q). */
static int detr_match(const float *logits, const float *boxes, int Q, int n_classes, const float *gt,
                      int G, const cs_detr_loss_params *p, int *match) {
    size_t n_cost;
    if (cs_mul_size((size_t)Q, (size_t)G, &n_cost) || n_cost > ((size_t)1 << 26))
        return cs_error(CELLSAM_ERR_LIMIT, "DETR loss: %d queries x %d boxes exceed the matcher's 2^26 entries",
                        Q, G);
    int k = Q < G ? Q : G;
    double *cost = malloc(n_cost * sizeof *cost);
    double *cls = malloc((size_t)Q * sizeof *cls);
    box_xyxy *pb = malloc((size_t)Q * sizeof *pb);
    box_xyxy *gb = malloc((size_t)G * sizeof *gb);
    int *row_ind = malloc((size_t)k * sizeof *row_ind);
    int *col_ind = malloc((size_t)k * sizeof *col_ind);
    int rc = CELLSAM_OK;
    if (!cost || !cls || !pb || !gb || !row_ind || !col_ind) {
        rc = cs_error(CELLSAM_ERR_NOMEM, "DETR loss: out of memory for a %d x %d cost matrix", Q, G);
        goto done;
    }
    double alpha = p->focal_alpha, gamma = p->focal_gamma;
    /* Only the target class enters the class cost, so it is one value per query. */
    for (int q = 0; q < Q; q++) {
        double prob = sigmoid_d(logits[(size_t)q * n_classes + p->target_class]);
        double neg = (1.0 - alpha) * pow(prob, gamma) * -log(1.0 - prob + 1e-8);
        double pos = alpha * pow(1.0 - prob, gamma) * -log(prob + 1e-8);
        cls[q] = (double)p->cost_class * (pos - neg);
        const float *b = boxes + (size_t)q * 4;
        pb[q] = to_xyxy(b[0], b[1], b[2], b[3]);
    }
    for (int g = 0; g < G; g++) {
        const float *b = gt + (size_t)g * 4;
        gb[g] = to_xyxy(b[0], b[1], b[2], b[3]);
    }
    double wb = p->cost_bbox, wg = p->cost_giou;
    for (int q = 0; q < Q; q++) {
        const float *b = boxes + (size_t)q * 4;
        double *row = cost + (size_t)q * G;
        for (int g = 0; g < G; g++) {
            const float *t = gt + (size_t)g * 4;
            double l1 = fabs((double)b[0] - t[0]) + fabs((double)b[1] - t[1]) + fabs((double)b[2] - t[2]) +
                        fabs((double)b[3] - t[3]);
            if (p->anchors) {
                const float *a = p->anchors + (size_t)q * 2;
                row[g] = fabs((double)a[0] - t[0]) + fabs((double)a[1] - t[1]);
            } else {
                row[g] = cls[q] + wb * l1 - wg * giou_value(&pb[q], &gb[g]);
            }
        }
    }
    rc = cs_linear_sum_assignment(cost, Q, G, row_ind, col_ind);
    if (rc) {
        cs_error_prefix(rc, "DETR loss matching");
        goto done;
    }
    for (int g = 0; g < G; g++) match[g] = -1;
    for (int i = 0; i < k; i++) match[col_ind[i]] = row_ind[i];
done:
    free(cost);
    free(cls);
    free(pb);
    free(gb);
    free(row_ind);
    free(col_ind);
    return rc;
}

/* One-to-many targets (cs_detr_loss_params.dense_center): owner[q] = the box whose
 * shrunk central region holds anchor q (nearest centre, in box-size units, wins);
 * then every box without a query takes its nearest anchor, unless that anchor is
 * the only one of another box. match[g] = the positive nearest box g's centre. */
static void dense_assign(const float *anchors, int Q, const float *gt, int G, float center, int *owner,
                         int *match, int *count, double *best) {
    for (int q = 0; q < Q; q++) owner[q] = -1;
    for (int g = 0; g < G; g++) count[g] = 0;
    for (int q = 0; q < Q; q++) {
        const float ax = anchors[2 * q], ay = anchors[2 * q + 1];
        double nearest = HUGE_VAL;
        for (int g = 0; g < G; g++) {
            const float *b = gt + (size_t)g * 4;
            double hx = 0.5 * center * b[2], hy = 0.5 * center * b[3];
            double dx = fabs((double)ax - b[0]), dy = fabs((double)ay - b[1]);
            if (dx > hx || dy > hy) continue;
            double d = dx / (b[2] + 1e-9) + dy / (b[3] + 1e-9);
            if (d < nearest) nearest = d, owner[q] = g;
        }
        if (owner[q] >= 0) count[owner[q]]++;
    }
    for (int g = 0; g < G; g++) {
        if (count[g]) continue;
        const float *b = gt + (size_t)g * 4;
        int qbest = -1;
        double nearest = HUGE_VAL;
        for (int q = 0; q < Q; q++) {
            double d = fabs((double)anchors[2 * q] - b[0]) + fabs((double)anchors[2 * q + 1] - b[1]);
            if (d < nearest) nearest = d, qbest = q;
        }
        if (qbest < 0) continue;
        int prev = owner[qbest];
        if (prev >= 0 && count[prev] <= 1) continue; /* two boxes share one anchor: the first keeps it */
        if (prev >= 0) count[prev]--;
        owner[qbest] = g;
        count[g] = 1;
    }
    for (int g = 0; g < G; g++) match[g] = -1;
    for (int q = 0; q < Q; q++) {
        int g = owner[q];
        if (g < 0) continue;
        double d = fabs((double)anchors[2 * q] - gt[4 * g]) + fabs((double)anchors[2 * q + 1] - gt[4 * g + 1]);
        if (match[g] < 0 || d < best[g]) {
            match[g] = q;
            best[g] = d;
        }
    }
}

int cs_detr_loss(const float *logits, const float *boxes, int Q, int n_classes, const float *gt_boxes,
                 int G, const cs_detr_loss_params *p, float *dlogits, float *dboxes, int *match,
                 cs_detr_loss_value *value) {
    int rc = check_detr_args(logits, boxes, Q, n_classes, gt_boxes, G, p);
    if (rc) return rc;
    int *m = NULL;     /* match[g] */
    int *owner = NULL; /* gt each query is a positive for, or -1 */
    int n_pos = 0;
    if (G > 0) {
        const int dense = p->dense_center > 0;
        m = malloc((size_t)G * sizeof *m);
        owner = malloc((size_t)Q * sizeof *owner);
        int *count = dense ? malloc((size_t)G * sizeof *count) : NULL;
        double *best = dense ? malloc((size_t)G * sizeof *best) : NULL;
        if (!m || !owner || (dense && (!count || !best))) {
            free(m);
            free(owner);
            free(count);
            free(best);
            return cs_error(CELLSAM_ERR_NOMEM, "DETR loss: out of memory for the matching");
        }
        if (dense) {
            dense_assign(p->anchors, Q, gt_boxes, G, p->dense_center, owner, m, count, best);
            free(count);
            free(best);
        } else {
            rc = detr_match(logits, boxes, Q, n_classes, gt_boxes, G, p, m);
            if (rc) {
                free(m);
                free(owner);
                return rc;
            }
            for (int q = 0; q < Q; q++) owner[q] = -1;
            for (int g = 0; g < G; g++)
                if (m[g] >= 0) owner[m[g]] = g;
        }
        for (int q = 0; q < Q; q++) n_pos += owner[q] >= 0;
    }
    /* DETR normalises by the number of boxes; one-to-many targets by the positives */
    double num_boxes = p->dense_center > 0 ? (n_pos > 0 ? n_pos : 1.0) : (G > 0 ? (double)G : 1.0);
    double alpha = p->focal_alpha, gamma = p->focal_gamma;

    /* Focal loss over every query and class; DETR's mean over queries times Q
     * reduces to the plain sum, divided by num_boxes. */
    double cls_sum = 0;
    double gscale = p->loss_class / num_boxes;
    for (int q = 0; q < Q; q++) {
        for (int c = 0; c < n_classes; c++) {
            size_t i = (size_t)q * n_classes + c;
            double t = (owner && owner[q] >= 0 && c == p->target_class) ? 1.0 : 0.0;
            double d;
            cls_sum += focal_elem(logits[i], t, alpha, gamma, dlogits ? &d : NULL);
            if (dlogits) dlogits[i] = (float)(gscale * d);
        }
    }

    double l1_sum = 0, giou_sum = 0;
    if (dboxes) memset(dboxes, 0, (size_t)Q * 4 * sizeof *dboxes);
    for (int q = 0; q < Q && owner; q++) {
        int g = owner[q];
        if (g < 0) continue;
        double pc[4], tc[4], dg[4];
        for (int k = 0; k < 4; k++) {
            pc[k] = boxes[(size_t)q * 4 + k];
            tc[k] = gt_boxes[(size_t)g * 4 + k];
        }
        double giou = giou_grad(pc, tc, dboxes ? dg : NULL);
        giou_sum += 1.0 - giou;
        for (int k = 0; k < 4; k++) {
            double d = pc[k] - tc[k];
            l1_sum += fabs(d);
            if (dboxes) {
                double sgn = d > 0 ? 1.0 : d < 0 ? -1.0 : 0.0;
                dboxes[(size_t)q * 4 + k] = (float)((p->loss_bbox * sgn - p->loss_giou * dg[k]) / num_boxes);
            }
        }
    }

    if (match)
        for (int g = 0; g < G; g++) match[g] = m[g];
    if (value) {
        value->cls = cls_sum / num_boxes;
        value->bbox = l1_sum / num_boxes;
        value->giou = giou_sum / num_boxes;
        value->total = p->loss_class * value->cls + p->loss_bbox * value->bbox + p->loss_giou * value->giou;
        value->n_matched = n_pos;
    }
    free(m);
    free(owner);
    return CELLSAM_OK;
}
