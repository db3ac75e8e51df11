/* PyTorch checkpoint reader (zip container + restricted unpickler). Placeholder:
 * being written. */
#include "common.h"
#include "weights.h"

int cs_weights_parse_pt(const unsigned char *data, size_t size, cs_weights **out) {
    (void)data;
    (void)size;
    *out = NULL;
    return cs_error(CELLSAM_ERR_UNSUPPORTED, "PyTorch checkpoints are not supported yet");
}
