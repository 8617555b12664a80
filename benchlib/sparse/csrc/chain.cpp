// A chain of packed calls (benchlib/sparse/chain.py) run by one call from Python: the layout
// copies and products of a run of sparse convs whose activations live in fixed buffers, so
// that the layers between them cost no Python (about 15-25 us a layer otherwise).

#include <cstdint>

extern "C" {

int benchlib_spmm_gather_packed(const int64_t* a);
int benchlib_conv_layout_packed(const int64_t* a);
int benchlib_mean_planes_packed(const int64_t* a);
int benchlib_dense_linear_packed(const int64_t* a);

// steps: `count` pairs (kind, address of a packed argument array), run in order; kind 0 is
// benchlib_spmm_gather_packed, 1 benchlib_conv_layout_packed, 2 benchlib_mean_planes_packed,
// 3 benchlib_dense_linear_packed. Returns 0, the first nonzero status of a step, or 3 for an
// unknown kind (nothing after it runs).
int benchlib_run_chain(const int64_t* steps, int64_t count) {
  for (int64_t s = 0; s < count; ++s) {
    const int64_t kind = steps[2 * s];
    const auto* args = reinterpret_cast<const int64_t*>(static_cast<intptr_t>(steps[2 * s + 1]));
    int status = 3;
    if (kind == 0) status = benchlib_spmm_gather_packed(args);
    if (kind == 1) status = benchlib_conv_layout_packed(args);
    if (kind == 2) status = benchlib_mean_planes_packed(args);
    if (kind == 3) status = benchlib_dense_linear_packed(args);
    if (status) return status;
  }
  return 0;
}

}  // extern "C"
