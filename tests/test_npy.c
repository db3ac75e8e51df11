/* .npy reader/writer: round trip, reference files, and malformed input. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

static void test_roundtrip(void **state) {
    (void)state;
    float data[6] = {1, -2.5f, 3, 4, 5e-8f, 6};
    int64_t shape[2] = {2, 3};
    char path[512];
    snprintf(path, sizeof path, "%s/a.npy", tu_tmpdir());
    assert_int_equal(cs_npy_save_f32(path, data, 2, shape), 0);
    cs_npy a;
    assert_int_equal(cs_npy_load(path, &a), 0);
    assert_int_equal(a.ndim, 2);
    assert_int_equal(a.shape[0], 2);
    assert_int_equal(a.shape[1], 3);
    assert_int_equal(a.dtype, CS_NPY_F32);
    assert_memory_equal(a.data, data, sizeof data);
    cs_npy_free(&a);
}

static void test_reference_dtypes(void **state) {
    (void)state;
    cs_npy a;
    tu_load(&a, "case_blobs256_u16/00_input.npy");
    assert_int_equal(a.dtype, CS_NPY_U16);
    assert_int_equal(a.ndim, 2);
    assert_int_equal(a.shape[0], 256);
    cs_npy_free(&a);
    tu_load(&a, "case_blobs256_u16/46_final_boxes_orig_frame.npy");
    assert_int_equal(a.dtype, CS_NPY_F64);
    cs_npy_free(&a);
}

static void test_malformed(void **state) {
    (void)state;
    cs_npy a;
    const unsigned char bad1[] = "\x93NUMPY\x01\x00\x10\x00{'descr': '<f4'";
    assert_int_not_equal(cs_npy_parse(bad1, sizeof bad1 - 1, &a), 0);
    const char hdr[] = "\x93NUMPY\x01\x00\x46\x00{'descr': '<f4', 'fortran_order': False, 'shape': (1000000, 1000000), }          \n";
    assert_int_not_equal(cs_npy_parse((const unsigned char *)hdr, sizeof hdr - 1, &a), 0);
    const char trunc[] = "\x93NUMPY\x01\x00\x46\x00{'descr': '<f4', 'fortran_order': False, 'shape': (4,), }                    \n\x00\x00";
    assert_int_not_equal(cs_npy_parse((const unsigned char *)trunc, sizeof trunc - 1, &a), 0);
    const char obj[] = "\x93NUMPY\x01\x00\x46\x00{'descr': '|O', 'fortran_order': False, 'shape': (4,), }                      \n";
    assert_int_not_equal(cs_npy_parse((const unsigned char *)obj, sizeof obj - 1, &a), 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_roundtrip),
        cmocka_unit_test(test_reference_dtypes),
        cmocka_unit_test(test_malformed),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
