// CUDA kernels of the token ops. Memory-bound: each kernel reads and writes every
// byte once with 16-byte vector accesses where the row allows it.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>


namespace videoprism {

// One block row per output token; threads stride over the row in units of V bytes.
template <typename V>
__global__ void gather_rows_kernel(const V* __restrict__ x, const int64_t* __restrict__ idx, V* __restrict__ out,
                                   int64_t L, int64_t M, int64_t row_vecs) {
  const int64_t r = blockIdx.x;  // r = b * M + j
  const int64_t b = r / M;
  const int64_t j = idx[r];
  if (j < 0 || j >= L) return;  // checked on the host side by the Python wrapper
  const V* src = x + (b * L + j) * row_vecs;
  V* dst = out + r * row_vecs;
  for (int64_t c = threadIdx.x; c < row_vecs; c += blockDim.x) dst[c] = src[c];
}

at::Tensor gather_tokens_cuda(const at::Tensor& x, const at::Tensor& idx) {
  TORCH_CHECK(x.dim() == 3, "gather_tokens: x must be [B, L, D], got ", x.sizes());
  TORCH_CHECK(idx.dim() == 2 && idx.size(0) == x.size(0),
              "gather_tokens: idx must be [B, M] with B = x.size(0) = ", x.size(0), ", got ", idx.sizes());
  TORCH_CHECK(idx.scalar_type() == at::kLong, "gather_tokens: idx must be int64, got ", idx.scalar_type());
  TORCH_CHECK(idx.device() == x.device(), "gather_tokens: x and idx must be on one device");
  c10::cuda::CUDAGuard guard(x.device());
  auto xc = x.contiguous();
  auto ic = idx.contiguous();
  const int64_t B = xc.size(0), L = xc.size(1), D = xc.size(2), M = ic.size(1);
  auto out = at::empty({B, M, D}, xc.options());
  if (out.numel() == 0) return out;
  const int64_t row_bytes = D * xc.element_size();
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int threads = 128;
  if (row_bytes % 16 == 0) {
    gather_rows_kernel<int4><<<B * M, threads, 0, stream>>>(
        reinterpret_cast<const int4*>(xc.data_ptr()), ic.data_ptr<int64_t>(), reinterpret_cast<int4*>(out.data_ptr()),
        L, M, row_bytes / 16);
  } else {
    gather_rows_kernel<char><<<B * M, threads, 0, stream>>>(
        static_cast<const char*>(xc.data_ptr()), ic.data_ptr<int64_t>(), static_cast<char*>(out.data_ptr()), L, M,
        row_bytes);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

TORCH_LIBRARY_IMPL(videoprism, CUDA, m) { m.impl("gather_tokens_native", &gather_tokens_cuda); }

}  // namespace videoprism
