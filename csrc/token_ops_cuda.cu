// CUDA kernels of the token ops (the "cuda" backend). Memory-bound: every kernel
// reads and writes each byte once, with 16-byte vector accesses wherever the row
// length and the pointers allow (otherwise the same kernels at width 1). Row kernels
// use 2-D blocks: x threads stride over one row's vectors, y indexes rows, so short
// rows still fill a block. Index values are checked in the kernels with device asserts
// (CUDA_KERNEL_ASSERT, on in release builds, as torch's own index kernels do): free for
// these memory-bound kernels, where a separate checking pass would cost a quarter of
// the op. Math: kernels/<op>.py.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "token_ops.h"

namespace videoprism {
namespace {

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

constexpr int kThreads = 256;

bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Elements per 16-byte vector when rows of `row_elems` elements of `elem_bytes` bytes and
// every pointer allow it, else 1.
int vec_width(int64_t row_elems, int64_t elem_bytes, std::initializer_list<const void*> ptrs) {
  const int64_t w = 16 / elem_bytes;
  if (w <= 1 || row_elems % w != 0) return 1;
  for (const void* p : ptrs)
    if (!aligned(p, 16)) return 1;
  return static_cast<int>(w);
}

// Block of (tx, ty): tx a multiple of 32 covering a row's vectors (at most kThreads), ty rows.
struct RowLaunch {
  dim3 grid, block;
};
RowLaunch row_launch(int64_t rows, int64_t row_vecs) {
  const int tx = static_cast<int>(std::min<int64_t>(kThreads, std::max<int64_t>(32, (row_vecs + 31) / 32 * 32)));
  const int ty = kThreads / tx;
  return {dim3(static_cast<unsigned>((rows + ty - 1) / ty)), dim3(tx, ty)};
}

__device__ __forceinline__ int64_t block_row() { return static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; }

// ---- gather: out[r] = x[b, idx[r]], r = b*M + j; a byte copy, V is the copy unit.
template <typename V>
__global__ void gather_rows_kernel(const V* __restrict__ x, const int64_t* __restrict__ idx, V* __restrict__ out,
                                   int64_t L, int64_t M, int64_t rows, int64_t row_vecs) {
  const int64_t r = block_row();
  if (r >= rows) return;
  const int64_t j = idx[r];
  CUDA_KERNEL_ASSERT(j >= 0 && j < L && "gather_tokens: idx value out of range [0, L)");
  if (j < 0 || j >= L) return;
  const V* src = x + ((r / M) * L + j) * row_vecs;
  V* dst = out + r * row_vecs;
  for (int64_t c = threadIdx.x; c < row_vecs; c += blockDim.x) dst[c] = src[c];
}

// ---- scatter: out[r] = sum of the CSR run of rows r = b*L + l (zeros when empty).
template <typename T, int VEC>
__global__ void scatter_rows_kernel(const T* __restrict__ src, const int64_t* __restrict__ order,
                                    const int64_t* __restrict__ offsets, T* __restrict__ out, int64_t L, int64_t M,
                                    int64_t rows, int64_t row_vecs) {
  using acc_t = at::opmath_type<T>;
  using P = Pack<T, VEC>;
  const int64_t r = block_row();
  if (r >= rows) return;
  const int64_t b = r / L, o = b * (L + 1) + r % L;
  const int64_t lo = offsets[o], hi = offsets[o + 1];
  // The CSR of sample b covers all M sources iff every index lies in [0, L).
  if (r % L == 0 && threadIdx.x == 0)
    CUDA_KERNEL_ASSERT(offsets[o] == 0 && offsets[o + L] == M && "scatter_tokens: idx value out of range [0, L)");
  const P* s = reinterpret_cast<const P*>(src) + b * M * row_vecs;
  P* dst = reinterpret_cast<P*>(out) + r * row_vecs;
  for (int64_t c = threadIdx.x; c < row_vecs; c += blockDim.x) {
    acc_t acc[VEC] = {};
    for (int64_t q = lo; q < hi; ++q) {
      const P v = s[order[b * M + q] * row_vecs + c];
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[e] += static_cast<acc_t>(v.v[e]);
    }
    P w;
#pragma unroll
    for (int e = 0; e < VEC; ++e) w.v[e] = static_cast<T>(acc[e]);
    dst[c] = w;
  }
}

// ---- shuffle forward: out[r] = (visible[b, p] or mask_emb) + pos_emb[i], r = b*n + i, p = perm[r].
template <typename T, int VEC>
__global__ void shuffle_fwd_kernel(const T* __restrict__ vis, const int64_t* __restrict__ perm,
                                   const at::opmath_type<T>* __restrict__ mask_emb,
                                   const at::opmath_type<T>* __restrict__ pos_emb, T* __restrict__ out, int64_t m,
                                   int64_t n, int64_t rows, int64_t row_vecs) {
  using acc_t = at::opmath_type<T>;
  using P = Pack<T, VEC>;
  using A = Pack<acc_t, VEC>;
  const int64_t r = block_row();
  if (r >= rows) return;
  const int64_t p = perm[r];
  CUDA_KERNEL_ASSERT(p >= 0 && p < n && "shuffle_with_mask_tokens: perm value out of range [0, n)");
  if (p < 0 || p >= n) return;
  const P* src = reinterpret_cast<const P*>(vis) + ((r / n) * m + p) * row_vecs;
  const A* pos = reinterpret_cast<const A*>(pos_emb) + (r % n) * row_vecs;
  const A* me = reinterpret_cast<const A*>(mask_emb);
  P* dst = reinterpret_cast<P*>(out) + r * row_vecs;
  for (int64_t c = threadIdx.x; c < row_vecs; c += blockDim.x) {
    const A pe = pos[c];
    A base;
    if (p < m) {
      const P v = src[c];
#pragma unroll
      for (int e = 0; e < VEC; ++e) base.v[e] = static_cast<acc_t>(v.v[e]);
    } else {
      base = me[c];
    }
    P w;
#pragma unroll
    for (int e = 0; e < VEC; ++e) w.v[e] = static_cast<T>(base.v[e] + pe.v[e]);
    dst[c] = w;
  }
}

// ---- shuffle backward: block (slot block, column block); each thread owns VEC columns
// of kSlots consecutive slots and walks the batch (reductions without atomics). The
// kSlots rows of one sample are loaded together: independent loads in flight per thread.
constexpr int kSlots = 4;
template <typename T, int VEC>
__global__ void shuffle_bwd_kernel(const T* __restrict__ grad, const int64_t* __restrict__ perm, T* __restrict__ gvis,
                                   at::opmath_type<T>* __restrict__ gpos, at::opmath_type<T>* __restrict__ part,
                                   int64_t B, int64_t m, int64_t n, int64_t row_vecs) {
  using acc_t = at::opmath_type<T>;
  using P = Pack<T, VEC>;
  using A = Pack<acc_t, VEC>;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (c >= row_vecs) return;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kSlots;
  const int slots = static_cast<int>(n - i0 < kSlots ? n - i0 : kSlots);
  const P* g = reinterpret_cast<const P*>(grad);
  P* gv = reinterpret_cast<P*>(gvis);
  A macc = {}, pacc[kSlots] = {};
  for (int64_t b = 0; b < B; ++b) {
    P v[kSlots];
    int64_t p[kSlots];
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      if (s < slots) {
        const int64_t row = b * n + i0 + s;
        p[s] = perm[row];
        CUDA_KERNEL_ASSERT(p[s] >= 0 && p[s] < n && "shuffle_with_mask_tokens: perm value out of range [0, n)");
        v[s] = g[row * row_vecs + c];
      }
    }
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      if (s >= slots) continue;
#pragma unroll
      for (int e = 0; e < VEC; ++e) pacc[s].v[e] += static_cast<acc_t>(v[s].v[e]);
      if (p[s] >= 0 && p[s] < m) {
        gv[(b * m + p[s]) * row_vecs + c] = v[s];
      } else if (p[s] >= m && p[s] < n) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) macc.v[e] += static_cast<acc_t>(v[s].v[e]);
      }
    }
  }
#pragma unroll
  for (int s = 0; s < kSlots; ++s)
    if (s < slots) reinterpret_cast<A*>(gpos)[(i0 + s) * row_vecs + c] = pacc[s];
  reinterpret_cast<A*>(part)[blockIdx.x * row_vecs + c] = macc;
}

// ---- patchify: one block per visible patch; thread t writes output features 4t..4t+3.
template <typename In, typename Out, bool VEC_OUT>
__global__ void patchify_gather_kernel(const In* __restrict__ video, const int64_t* __restrict__ pos,
                                       Out* __restrict__ out, int64_t K, int64_t N, int64_t NW, int64_t H, int64_t W,
                                       int64_t P) {
  const int64_t r = blockIdx.x;
  const int64_t nidx = pos[r];
  CUDA_KERNEL_ASSERT(nidx >= 0 && nidx < N && "patchify_gather: pos value out of range [0, N)");
  if (nidx < 0 || nidx >= N) return;
  // Feature f = p*run + u reads pixel-row p, element u of the patch's run. Index math in
  // int32 with one division per 4 features (a 64-bit division per element would make
  // this kernel compute-bound).
  const int run = static_cast<int>(3 * P), F = static_cast<int>(P) * run;
  const int64_t row_stride = W * 3;
  const In* base = video + (r / K) * H * row_stride + (nidx / NW) * P * row_stride + (nidx % NW) * run;
  Out* dst = out + r * F;
  for (int f0 = 4 * threadIdx.x; f0 < F; f0 += 4 * blockDim.x) {
    Pack<Out, 4> w;
    int p = f0 / run, u = f0 - p * run;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (f0 + e < F) {
        const In v = base[p * row_stride + u];
        if constexpr (std::is_same_v<In, uint8_t>) {
          w.v[e] = static_cast<float>(v) * (1.0f / 255.0f);  // the one rounding every backend does
        } else {
          w.v[e] = static_cast<Out>(v);
        }
      }
      if (++u == run) u = 0, ++p;
    }
    if constexpr (VEC_OUT) {
      *reinterpret_cast<Pack<Out, 4>*>(dst + f0) = w;
    } else {
      for (int e = 0; e < 4 && f0 + e < F; ++e) dst[f0 + e] = w.v[e];
    }
  }
}

}  // namespace

at::Tensor gather_tokens_cuda(const at::Tensor& x, const at::Tensor& idx) {
  check_tokens("gather_tokens", "x", x);
  check_index("gather_tokens", "idx", idx, x, -1);
  c10::cuda::CUDAGuard guard(x.device());
  auto xc = x.contiguous();
  auto ic = idx.contiguous();
  const int64_t B = xc.size(0), L = xc.size(1), D = xc.size(2), M = ic.size(1);
  auto out = at::empty({B, M, D}, xc.options());
  if (out.numel() == 0) return out;
  const int64_t row_bytes = D * xc.element_size();
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int w = vec_width(row_bytes, 1, {xc.data_ptr(), out.data_ptr()});
  auto launch = [&](auto unit) {
    using V = decltype(unit);
    const int64_t row_vecs = row_bytes / sizeof(V);
    const auto l = row_launch(B * M, row_vecs);
    gather_rows_kernel<V><<<l.grid, l.block, 0, stream>>>(static_cast<const V*>(xc.data_ptr()),
                                                          ic.data_ptr<int64_t>(), static_cast<V*>(out.data_ptr()), L,
                                                          M, B * M, row_vecs);
  };
  if (w == 16) {
    launch(int4{});
  } else if (row_bytes % 4 == 0 && aligned(xc.data_ptr(), 4) && aligned(out.data_ptr(), 4)) {
    launch(int{});
  } else {
    launch(char{});
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor scatter_tokens_cuda(const at::Tensor& src, const at::Tensor& idx, int64_t length) {
  check_tokens("scatter_tokens", "src", src);
  check_float("scatter_tokens", "src", src);
  check_index("scatter_tokens", "idx", idx, src, src.size(1));
  TORCH_CHECK(length >= 0, "scatter_tokens: length must be >= 0, got ", length);
  c10::cuda::CUDAGuard guard(src.device());
  auto sc = src.contiguous();
  auto ic = idx.contiguous();
  const int64_t B = sc.size(0), M = sc.size(1), D = sc.size(2), L = length;
  auto out = at::empty({B, L, D}, sc.options());
  if (out.numel() == 0) return out;
  // CSR on the device: a stable sort of the [B, M] indices and L + 1 binary searches per sample.
  auto sorted = at::sort(ic, /*stable=*/true, /*dim=*/1, /*descending=*/false);
  auto order = std::get<1>(sorted).contiguous();
  auto bounds = at::arange(L + 1, ic.options()).expand({B, L + 1}).contiguous();
  auto offsets = at::searchsorted(std::get<0>(sorted).contiguous(), bounds);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sc.scalar_type(), "scatter_tokens_cuda", [&] {
    auto launch = [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      const auto l = row_launch(B * L, D / VEC);
      scatter_rows_kernel<scalar_t, VEC><<<l.grid, l.block, 0, stream>>>(
          sc.data_ptr<scalar_t>(), order.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), out.data_ptr<scalar_t>(),
          L, M, B * L, D / VEC);
    };
    if (vec_width(D, sizeof(scalar_t), {sc.data_ptr(), out.data_ptr()}) > 1) {
      launch(std::integral_constant<int, 16 / sizeof(scalar_t)>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor shuffle_tokens_fwd_cuda(const at::Tensor& visible, const at::Tensor& perm, const at::Tensor& mask_emb,
                                   const at::Tensor& pos_emb) {
  const auto [B, m, n, D] = check_shuffle_fwd(visible, perm, mask_emb, pos_emb);
  c10::cuda::CUDAGuard guard(visible.device());
  auto vc = visible.contiguous();
  auto pc = perm.contiguous();
  const auto acc = acc_type(vc.scalar_type());
  auto me = mask_emb.to(acc).contiguous();
  auto pe = pos_emb.to(acc).contiguous();
  auto out = at::empty({B, n, D}, vc.options());
  if (out.numel() == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, vc.scalar_type(), "shuffle_tokens_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto launch = [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      const auto l = row_launch(B * n, D / VEC);
      shuffle_fwd_kernel<scalar_t, VEC><<<l.grid, l.block, 0, stream>>>(
          vc.data_ptr<scalar_t>(), pc.data_ptr<int64_t>(), me.data_ptr<acc_t>(), pe.data_ptr<acc_t>(),
          out.data_ptr<scalar_t>(), m, n, B * n, D / VEC);
    };
    constexpr int W = 16 / sizeof(scalar_t);
    // The fp32 embedding rows are read as W-wide packs too: they need W*4-byte alignment.
    if (vec_width(D, sizeof(scalar_t), {vc.data_ptr(), out.data_ptr()}) > 1 &&
        aligned(me.data_ptr(), W * sizeof(acc_t)) && aligned(pe.data_ptr(), W * sizeof(acc_t))) {
      launch(std::integral_constant<int, W>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> shuffle_tokens_bwd_cuda(const at::Tensor& grad, const at::Tensor& perm,
                                                                       int64_t m) {
  check_shuffle_bwd(grad, perm, m);
  c10::cuda::CUDAGuard guard(grad.device());
  auto gc = grad.contiguous();
  auto pc = perm.contiguous();
  const int64_t B = gc.size(0), n = gc.size(1), D = gc.size(2);
  const auto acc = acc_type(gc.scalar_type());
  auto gvis = at::empty({B, m, D}, gc.options());
  // The kernel writes every row of gpos and part (zeros when B = 0): no memset pass.
  auto gpos = at::empty({n, D}, gc.options().dtype(acc));
  const int64_t n_blocks = (n + kSlots - 1) / kSlots;
  auto part = at::empty({n_blocks, D}, gc.options().dtype(acc));
  if (n * D > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gc.scalar_type(), "shuffle_tokens_bwd_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      auto launch = [&](auto vec) {
        constexpr int VEC = decltype(vec)::value;
        const int64_t row_vecs = D / VEC;
        const int tx = static_cast<int>(std::min<int64_t>(kThreads, (row_vecs + 31) / 32 * 32));
        const dim3 grid(static_cast<unsigned>(n_blocks), static_cast<unsigned>((row_vecs + tx - 1) / tx));
        shuffle_bwd_kernel<scalar_t, VEC><<<grid, tx, 0, stream>>>(gc.data_ptr<scalar_t>(), pc.data_ptr<int64_t>(),
                                                                   gvis.data_ptr<scalar_t>(), gpos.data_ptr<acc_t>(),
                                                                   part.data_ptr<acc_t>(), B, m, n, row_vecs);
      };
      if (vec_width(D, sizeof(scalar_t), {gc.data_ptr(), gvis.data_ptr()}) > 1) {
        launch(std::integral_constant<int, 16 / sizeof(scalar_t)>{});
      } else {
        launch(std::integral_constant<int, 1>{});
      }
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {gvis, part.sum(0), gpos};
}

at::Tensor patchify_gather_cuda(const at::Tensor& video, const at::Tensor& pos, int64_t P) {
  const auto [B, T, H, W, K] = check_patchify(video, pos, P);
  c10::cuda::CUDAGuard guard(video.device());
  auto vc = video.contiguous();
  auto pc = pos.contiguous();
  const int64_t F = P * P * 3, NW = W / P, N = (H / P) * NW;
  auto out = at::empty({B, T, K, F}, vc.options().dtype(patchify_out_type(vc.scalar_type())));
  if (out.numel() == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int threads = static_cast<int>(std::min<int64_t>(kThreads, ((F + 3) / 4 + 31) / 32 * 32));
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, vc.scalar_type(), "patchify_gather_cuda", [&] {
    using out_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    auto launch = [&](auto vec_out) {
      patchify_gather_kernel<scalar_t, out_t, decltype(vec_out)::value>
          <<<static_cast<unsigned>(B * T * K), threads, 0, stream>>>(vc.data_ptr<scalar_t>(), pc.data_ptr<int64_t>(),
                                                                     out.data_ptr<out_t>(), K, N, NW, H, W, P);
    };
    if (F % 4 == 0 && aligned(out.data_ptr(), 4 * sizeof(out_t))) {
      launch(std::true_type{});
    } else {
      launch(std::false_type{});
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

TORCH_LIBRARY_IMPL(videoprism, CUDA, m) {
  m.impl("gather_tokens_native", &gather_tokens_cuda);
  m.impl("scatter_tokens_native", &scatter_tokens_cuda);
  m.impl("shuffle_tokens_fwd_native", &shuffle_tokens_fwd_cuda);
  m.impl("shuffle_tokens_bwd_native", &shuffle_tokens_bwd_cuda);
  m.impl("patchify_gather_native", &patchify_gather_cuda);
}

}  // namespace videoprism
