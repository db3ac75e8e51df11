/* cellsam_train's callbacks, as a labeling tool uses them: progress after every
 * optimiser step (the figures so far, the run's total steps) and abort (stop cleanly,
 * with the model saved). Fine-tunes the reference checkpoint on the bundled sample. */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cellsam.h"
#include "testutil.h"

typedef struct {
    int calls;
    int64_t steps[16];
    int64_t total;
    int monotonic;
    int stop_after; /* abort at this step (0: never) */
    int abort_calls;
} watcher;

static void on_progress(const struct cellsam_train_report *r, int64_t total_steps, void *user) {
    watcher *w = user;
    if (w->calls > 0 && r->steps < w->steps[(w->calls - 1) % 16]) w->monotonic = 0;
    w->steps[w->calls % 16] = r->steps;
    w->total = total_steps;
    w->calls++;
}

static int should_abort(void *user) {
    watcher *w = user;
    w->abort_calls++;
    return w->stop_after > 0 && w->abort_calls >= w->stop_after; /* asked once after every step */
}

static void quiet_log(const char *line, void *user) {
    (void)line;
    (void)user;
}

/* Fine-tune the reference checkpoint on the pairs in data_dir into out, watched by w. */
static cellsam_train_params run_params(const char *data_dir, const char *out, watcher *w) {
    cellsam_train_params p = cellsam_train_default_params();
    p.data_dir = data_dir;
    p.init_model = tu_path("checkpoint.safetensors");
    p.out_path = out;
    p.val_fraction = 0;
    p.images_per_step = 1;
    p.prompts_per_image = 2;
    p.n_threads = 2;
    p.progress = on_progress;
    p.abort = should_abort;
    p.callback_user = w;
    p.log = quiet_log;
    return p;
}

/* The bundled sample: one pair. */
static const char *sample_dir(void) {
    static char dir[1024];
    snprintf(dir, sizeof dir, "%s/stardist_example", tu_datadir());
    return dir;
}

static cellsam_train_report train_or_fail(const cellsam_train_params *p) {
    cellsam_train_report r;
    if (cellsam_train(p, &r)) fail_msg("cellsam_train: %s", cellsam_last_error());
    return r;
}

static void test_abort_saves_and_stops(void **state) {
    (void)state;
    const char *out = tu_tmp("abort.safetensors");
    watcher w = {.monotonic = 1, .stop_after = 3};
    cellsam_train_params p = run_params(sample_dir(), out, &w);
    p.max_steps = 1000;
    cellsam_train_report r = train_or_fail(&p);
    assert_int_equal(r.aborted, 1);
    assert_int_equal(r.steps, 3);
    /* a call before the first step; then, one image per step, every step ends an epoch, and
     * each gets a call after the step and one after the epoch's (empty) validation */
    assert_int_equal(w.calls, 7);
    assert_int_equal(r.epochs_done, 3);
    assert_int_equal(w.abort_calls, 3);
    assert_true(w.monotonic);
    assert_int_equal(w.steps[0], 0);
    assert_int_equal(w.steps[1], 1);
    assert_int_equal(w.steps[6], 3);
    assert_int_equal(w.total, 1000);
    assert_int_equal(r.train_images, 1);
    assert_int_equal(r.val_images, 0);
    assert_true(r.last_loss > 0);
    /* saved before stopping: the model loads, and the optimiser state is there to resume */
    cellsam_model *m = NULL;
    cellsam_model_params mp = cellsam_model_default_params();
    if (cellsam_model_load(out, &mp, &m)) fail_msg("the aborted run's model does not load: %s", cellsam_last_error());
    cellsam_model_free(m);
    char st[1100];
    snprintf(st, sizeof st, "%s.state", out);
    assert_int_equal(access(st, R_OK), 0);
}

static void test_progress_without_abort(void **state) {
    (void)state;
    watcher w = {.monotonic = 1};
    cellsam_train_params p = run_params(sample_dir(), tu_tmp("full.safetensors"), &w);
    p.abort = NULL;
    p.epochs = 2; /* 1 image, 1 per step: 2 steps, each an epoch end (no validation images) */
    p.save_optimizer_state = 0;
    cellsam_train_report r = train_or_fail(&p);
    assert_int_equal(r.aborted, 0);
    assert_int_equal(r.steps, 2);
    assert_int_equal(r.epochs_done, 2);
    /* a call before the first step, one per step and one per epoch end */
    assert_int_equal(w.calls, 5);
    assert_true(w.monotonic);
    assert_int_equal(w.total, 2);
    assert_true(r.val_f1 < 0); /* nothing held out */
    assert_int_equal(access(tu_tmp("full.safetensors"), R_OK), 0);
    assert_int_not_equal(access(tu_tmp("full.safetensors.state"), F_OK), 0); /* save_optimizer_state 0 */
}

/* Two pairs, one held out: a stop at an epoch end skips that epoch's validation pass;
 * a run that ends by itself validates. */
static void test_abort_skips_validation(void **state) {
    (void)state;
    const char *dir = tu_tmp("two");
    char out[256];
    static const char *const names[] = {"0114f484a16c152baa2d82fdd43740880a762c93f436c8988ac461c5c9dbe7d5",
                                         "38f5cfb55fc8b048e82a5c895b25fefae7a70c71ab9990c535d1030637bf6a1f"};
    assert_int_equal(tu_run(out, sizeof out, "mkdir -p %s", dir), 0);
    for (int i = 0; i < 2; i++)
        assert_int_equal(tu_run(out, sizeof out, "ln -sf %s/dsb2018_stage1_test/%s_img.png %s/dsb2018_stage1_test/%s_masks.png %s/",
                                tu_datadir(), names[i], tu_datadir(), names[i], dir),
                         0);
    for (int stop = 1; stop >= 0; stop--) {
        watcher w = {.monotonic = 1, .stop_after = stop};
        cellsam_train_params p = run_params(dir, tu_tmp("val%d.safetensors", stop), &w);
        p.val_fraction = 0.5f;
        p.epochs = 1;
        cellsam_train_report r = train_or_fail(&p);
        assert_int_equal(r.train_images, 1);
        assert_int_equal(r.val_images, 1);
        assert_int_equal(r.steps, 1);
        assert_int_equal(r.aborted, stop);
        assert_int_equal(r.epochs_done, 1);
        if (stop) assert_true(r.val_f1 < 0);   /* not validated */
        else assert_true(r.val_f1 >= 0);       /* validated */
    }
}

static void test_errors_reach_the_report(void **state) {
    (void)state;
    watcher w = {.monotonic = 1};
    char out[256];
    const char *empty = tu_tmp("empty"); /* no pairs */
    assert_int_equal(tu_run(out, sizeof out, "mkdir -p %s", empty), 0);
    cellsam_train_params p = run_params(empty, tu_tmp("none.safetensors"), &w);
    cellsam_train_report r;
    memset(&r, 0x55, sizeof r);
    int rc = cellsam_train(&p, &r);
    assert_int_not_equal(rc, CELLSAM_OK);
    assert_int_equal(r.steps, 0);
    assert_int_equal(r.aborted, 0);
    assert_int_equal(w.calls, 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_abort_saves_and_stops),
        cmocka_unit_test(test_progress_without_abort),
        cmocka_unit_test(test_abort_skips_validation),
        cmocka_unit_test(test_errors_reach_the_report),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
