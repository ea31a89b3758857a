// CPU kernels of the token ops: one pass over the bytes, rows copied with memcpy
// (the compiler vectorises it), batches*rows split over threads by at::parallel_for.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <cstring>

namespace videoprism {

at::Tensor gather_tokens_cpu(const at::Tensor& x, const at::Tensor& idx) {
  TORCH_CHECK(x.dim() == 3, "gather_tokens: x must be [B, L, D], got ", x.sizes());
  TORCH_CHECK(idx.dim() == 2 && idx.size(0) == x.size(0),
              "gather_tokens: idx must be [B, M] with B = x.size(0) = ", x.size(0), ", got ", idx.sizes());
  TORCH_CHECK(idx.scalar_type() == at::kLong, "gather_tokens: idx must be int64, got ", idx.scalar_type());
  auto xc = x.contiguous();
  auto ic = idx.contiguous();
  const int64_t B = xc.size(0), L = xc.size(1), D = xc.size(2), M = ic.size(1);
  auto out = at::empty({B, M, D}, xc.options());
  const int64_t row_bytes = D * xc.element_size();
  const char* src = static_cast<const char*>(xc.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  const int64_t* ip = ic.data_ptr<int64_t>();
  at::parallel_for(0, B * M, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / M;
      const int64_t j = ip[r];
      TORCH_CHECK(j >= 0 && j < L, "gather_tokens: index ", j, " out of range [0, ", L, ")");
      std::memcpy(dst + r * row_bytes, src + (b * L + j) * row_bytes, row_bytes);
    }
  });
  return out;
}

TORCH_LIBRARY_IMPL(videoprism, CPU, m) { m.impl("gather_tokens_native", &gather_tokens_cpu); }

}  // namespace videoprism
