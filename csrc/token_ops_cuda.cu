// CUDA kernels of the token ops (the "cuda" backend). Memory-bound: every kernel
// reads and writes each byte once, with 16-byte vector accesses wherever the row
// length and the pointers allow (otherwise the same kernels at a narrower width).
//
// Row kernels (gather, scatter, shuffle forward, patchify) move a tile of whole rows per
// block: a block of kThreads threads owns `block_rows` consecutive output rows, about
// kTileVecs vectors (32 KB at 16 bytes). Its first threads resolve the source row of each
// of its rows (one coalesced index load) into shared memory; then the tile's vectors,
// flattened row-major, are spread over the threads, consecutive threads on consecutive
// vectors, and each thread issues kUnroll loads before its kUnroll stores. So a D=768
// bf16 row (96 vectors) keeps every lane busy, each thread has 64 bytes in flight, and
// the grid is a few thousand blocks instead of one tiny block per row (which left
// threads idle and was bound by per-block latency at these ~100 MB sizes).
// Index values are checked in the kernels with device asserts (CUDA_KERNEL_ASSERT, on
// in release builds, as torch's own index kernels do): free for these memory-bound
// kernels, where a separate checking pass would cost a quarter of the op. Math:
// kernels/<op>.py.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>

#include "token_ops.h"

namespace videoprism {
namespace {

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

constexpr int kThreads = 256;
constexpr int kUnroll = 4;                           // loads in flight per thread
constexpr int kTileVecs = 2 * kThreads * kUnroll;    // vectors per block tile (two rounds)
constexpr int kMaxBlockRows = 256;                   // shared-memory row table size

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

// Tiles of whole rows: rows per block and the grid.
struct RowTiles {
  int block_rows;
  dim3 grid;
};
RowTiles row_tiles(int64_t rows, int64_t row_vecs) {
  const int br = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(kMaxBlockRows, kTileVecs / row_vecs)));
  return {br, dim3(static_cast<unsigned>((rows + br - 1) / br))};
}

// The kernels index rows within a sample and vectors within a tile in int32 (a tile
// holds at most max(kTileVecs, row_vecs) vectors, walked in steps of kThreads*kUnroll).
constexpr int64_t kMaxRowVecs = INT_MAX - kThreads * kUnroll;
void check_int32(const char* op, const char* what, int64_t v, int64_t limit = INT_MAX) {
  TORCH_CHECK(v <= limit, op, ": ", what, " = ", v, " exceeds ", limit, ", the int32 indexing of the CUDA kernels; ",
              "split the batch or use backend='triton'");
}

// Rows of this block's tile: [row0, row0 + count).
struct Tile {
  int64_t row0;
  int count;
};
__device__ __forceinline__ Tile block_tile(int64_t rows, int block_rows) {
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * block_rows;
  return {row0, static_cast<int>(rows - row0 < block_rows ? rows - row0 : block_rows)};
}

// Walks the tile's count*row_vecs vectors: load(lr, c) for kUnroll vectors (lr the row in
// the tile, c the vector in the row), then store(lr, c, loaded) for the same ones, so the
// loads of a thread are in flight together. Needs blockDim.x == kThreads.
template <typename Load, typename Store>
__device__ __forceinline__ void for_tile_vecs(int count, int row_vecs, Load load, Store store) {
  using V = decltype(load(0, 0));
  const int total = count * row_vecs;
  for (int e0 = threadIdx.x; e0 < total; e0 += kThreads * kUnroll) {
    V v[kUnroll];
    int lr[kUnroll], c[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int e = e0 + u * kThreads;
      lr[u] = e / row_vecs;
      c[u] = e - lr[u] * row_vecs;
      if (e < total) v[u] = load(lr[u], c[u]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (e0 + u * kThreads < total) store(lr[u], c[u], v[u]);
  }
}

// ---- gather: out[r] = x[b, idx[r]], r = b*M + j; a byte copy, V is the copy unit.
template <typename V>
__global__ void __launch_bounds__(kThreads)
    gather_rows_kernel(const V* __restrict__ x, const int64_t* __restrict__ idx, V* __restrict__ out, int L, int M,
                       int64_t rows, int row_vecs, int block_rows) {
  __shared__ int64_t src_row[kMaxBlockRows];  // b*L + idx[r]; -1 for an index out of range (asserted, not read)
  const Tile t = block_tile(rows, block_rows);
  for (int lr = threadIdx.x; lr < t.count; lr += kThreads) {
    const int64_t r = t.row0 + lr, j = idx[r];
    CUDA_KERNEL_ASSERT(j >= 0 && j < L && "gather_tokens: idx value out of range [0, L)");
    src_row[lr] = (j >= 0 && j < L) ? (r / M) * L + j : -1;
  }
  __syncthreads();
  V* dst = out + t.row0 * row_vecs;
  for_tile_vecs(
      t.count, row_vecs,
      [&](int lr, int c) {
        const int64_t s = src_row[lr];
        return s >= 0 ? x[s * row_vecs + c] : V{};
      },
      [&](int lr, int c, const V& v) { dst[static_cast<int64_t>(lr) * row_vecs + c] = v; });
}

// ---- scatter: out[r] = sum of the CSR run of rows r = b*L + l (zeros when empty). The
// load phase fetches the run's first source (the only one when indices are unique, the
// masking case); further sources are added in ascending j in the store phase.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    scatter_rows_kernel(const T* __restrict__ src, const int64_t* __restrict__ order,
                        const int64_t* __restrict__ offsets, T* __restrict__ out, int L, int M, int64_t rows,
                        int row_vecs, int block_rows) {
  using acc_t = at::opmath_type<T>;
  using P = Pack<T, VEC>;
  __shared__ int64_t run_base[kMaxBlockRows];  // b*M: the sample's first source row and first slot of order
  __shared__ int run_lo[kMaxBlockRows], run_len[kMaxBlockRows];
  const Tile t = block_tile(rows, block_rows);
  for (int lr = threadIdx.x; lr < t.count; lr += kThreads) {
    const int64_t r = t.row0 + lr, b = r / L, o = b * (L + 1) + (r - b * L);
    const int64_t lo = offsets[o];
    // The CSR of sample b covers all M sources iff every index lies in [0, L).
    if (r == b * L)
      CUDA_KERNEL_ASSERT(lo == 0 && offsets[o + L] == M && "scatter_tokens: idx value out of range [0, L)");
    run_base[lr] = b * M;
    run_lo[lr] = static_cast<int>(lo);
    run_len[lr] = static_cast<int>(offsets[o + 1] - lo);
  }
  __syncthreads();
  const P* s = reinterpret_cast<const P*>(src);
  P* dst = reinterpret_cast<P*>(out) + t.row0 * row_vecs;
  auto source = [&](int lr, int q, int c) {  // the q-th source of tile row lr, vector c
    const int64_t base = run_base[lr];
    return s[(base + order[base + run_lo[lr] + q]) * row_vecs + c];
  };
  for_tile_vecs(
      t.count, row_vecs, [&](int lr, int c) { return run_len[lr] > 0 ? source(lr, 0, c) : P{}; },
      [&](int lr, int c, const P& first) {
        const int len = run_len[lr];
        P w = first;  // zeros, or the one source: a copy
        if (len > 1) {
          acc_t acc[VEC];
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[e] = static_cast<acc_t>(first.v[e]);
          for (int q = 1; q < len; ++q) {
            const P v = source(lr, q, c);
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc[e] += static_cast<acc_t>(v.v[e]);
          }
#pragma unroll
          for (int e = 0; e < VEC; ++e) w.v[e] = static_cast<T>(acc[e]);
        }
        dst[static_cast<int64_t>(lr) * row_vecs + c] = w;
      });
}

// ---- shuffle forward: out[r] = (visible[b, p] or mask_emb) + pos_emb[i], r = b*n + i, p = perm[r].
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    shuffle_fwd_kernel(const T* __restrict__ vis, const int64_t* __restrict__ perm,
                       const at::opmath_type<T>* __restrict__ mask_emb, const at::opmath_type<T>* __restrict__ pos_emb,
                       T* __restrict__ out, int m, int n, int64_t rows, int row_vecs, int block_rows) {
  using acc_t = at::opmath_type<T>;
  using P = Pack<T, VEC>;
  using A = Pack<acc_t, VEC>;
  __shared__ int64_t src_row[kMaxBlockRows];  // visible row b*m + p, or -1 for a mask slot
  __shared__ int slot[kMaxBlockRows];
  const Tile t = block_tile(rows, block_rows);
  for (int lr = threadIdx.x; lr < t.count; lr += kThreads) {
    const int64_t r = t.row0 + lr, b = r / n, p = perm[r];
    CUDA_KERNEL_ASSERT(p >= 0 && p < n && "shuffle_with_mask_tokens: perm value out of range [0, n)");
    src_row[lr] = (p >= 0 && p < m) ? b * m + p : -1;
    slot[lr] = static_cast<int>(r - b * n);
  }
  __syncthreads();
  const P* v = reinterpret_cast<const P*>(vis);
  const A* pos = reinterpret_cast<const A*>(pos_emb);
  const A* me = reinterpret_cast<const A*>(mask_emb);
  P* dst = reinterpret_cast<P*>(out) + t.row0 * row_vecs;
  struct Loaded {
    P token;  // the visible token (visible slots)
    A mask;   // mask_emb (mask slots)
    A pe;
  };
  for_tile_vecs(
      t.count, row_vecs,
      [&](int lr, int c) {
        Loaded l;
        const int64_t sr = src_row[lr];
        if (sr >= 0) {
          l.token = v[sr * row_vecs + c];
        } else {
          l.mask = me[c];
        }
        l.pe = pos[static_cast<int64_t>(slot[lr]) * row_vecs + c];
        return l;
      },
      [&](int lr, int c, const Loaded& l) {
        const bool visible = src_row[lr] >= 0;
        P w;
#pragma unroll
        for (int e = 0; e < VEC; ++e)
          w.v[e] = static_cast<T>((visible ? static_cast<acc_t>(l.token.v[e]) : l.mask.v[e]) + l.pe.v[e]);
        dst[static_cast<int64_t>(lr) * row_vecs + c] = w;
      });
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

// ---- patchify: tiles of whole patches; the unit of work is a group of 4 output features
// (one 16-byte fp32 store). Feature f = p*run + u reads pixel-row p, element u of the
// patch's run of run = 3P contiguous elements (54 bytes of uint8 at P = 18); the 4 reads
// of a group are issued in the load phase, converted and stored in the store phase.
template <typename In, typename Out, bool VEC_OUT>
__global__ void __launch_bounds__(kThreads)
    patchify_gather_kernel(const In* __restrict__ video, const int64_t* __restrict__ pos, Out* __restrict__ out,
                           int64_t rows, int K, int N, int NW, int P, int row_stride, int64_t frame_stride,
                           int block_rows) {
  __shared__ int64_t patch_start[kMaxBlockRows];  // the patch's first element; -1 for pos out of range (asserted)
  const Tile t = block_tile(rows, block_rows);
  const int run = 3 * P, F = P * run, groups = (F + 3) / 4;
  for (int lr = threadIdx.x; lr < t.count; lr += kThreads) {
    const int64_t r = t.row0 + lr, nidx = pos[r];
    CUDA_KERNEL_ASSERT(nidx >= 0 && nidx < N && "patchify_gather: pos value out of range [0, N)");
    const int ni = static_cast<int>(nidx);
    patch_start[lr] = (nidx >= 0 && nidx < N)
                          ? (r / K) * frame_stride + static_cast<int64_t>(ni / NW) * P * row_stride + (ni % NW) * run
                          : -1;
  }
  __syncthreads();
  Out* dst = out + t.row0 * F;
  struct Raw {
    In v[4];
  };
  for_tile_vecs(
      t.count, groups,
      [&](int lr, int g) {
        Raw raw = {};
        const int64_t start = patch_start[lr];
        const int f0 = 4 * g;
        int p = f0 / run, u = f0 - p * run;  // int32 math: one division per group
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (start >= 0 && f0 + e < F) raw.v[e] = video[start + p * row_stride + u];
          if (++u == run) u = 0, ++p;
        }
        return raw;
      },
      [&](int lr, int g, const Raw& raw) {
        Pack<Out, 4> w;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if constexpr (std::is_same_v<In, uint8_t>) {
            w.v[e] = static_cast<float>(raw.v[e]) * (1.0f / 255.0f);  // the one rounding every backend does
          } else {
            w.v[e] = static_cast<Out>(raw.v[e]);
          }
        }
        Out* o = dst + static_cast<int64_t>(lr) * F + 4 * g;
        if constexpr (VEC_OUT) {
          *reinterpret_cast<Pack<Out, 4>*>(o) = w;
        } else {
          for (int e = 0; e < 4 && 4 * g + e < F; ++e) o[e] = w.v[e];
        }
      });
}

}  // namespace

at::Tensor gather_tokens_cuda(const at::Tensor& x, const at::Tensor& idx) {
  check_tokens("gather_tokens", "x", x);
  check_index("gather_tokens", "idx", idx, x, -1);
  c10::cuda::CUDAGuard guard(x.device());
  auto xc = x.contiguous();
  auto ic = idx.contiguous();
  const int64_t B = xc.size(0), L = xc.size(1), D = xc.size(2), M = ic.size(1);
  check_int32("gather_tokens", "L (tokens per sample)", L);
  check_int32("gather_tokens", "M (indices per sample)", M);
  auto out = at::empty({B, M, D}, xc.options());
  if (out.numel() == 0) return out;
  const int64_t row_bytes = D * xc.element_size();
  check_int32("gather_tokens", "bytes per row", row_bytes, kMaxRowVecs);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int w = vec_width(row_bytes, 1, {xc.data_ptr(), out.data_ptr()});
  auto launch = [&](auto unit) {
    using V = decltype(unit);
    const int64_t row_vecs = row_bytes / sizeof(V);
    const auto tiles = row_tiles(B * M, row_vecs);
    gather_rows_kernel<V><<<tiles.grid, kThreads, 0, stream>>>(
        static_cast<const V*>(xc.data_ptr()), ic.data_ptr<int64_t>(), static_cast<V*>(out.data_ptr()),
        static_cast<int>(L), static_cast<int>(M), B * M, static_cast<int>(row_vecs), tiles.block_rows);
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
  check_int32("scatter_tokens", "length (rows per sample)", L);
  check_int32("scatter_tokens", "M (indices per sample)", M);
  check_int32("scatter_tokens", "D (features per row)", D, kMaxRowVecs);
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
      const auto tiles = row_tiles(B * L, D / VEC);
      scatter_rows_kernel<scalar_t, VEC><<<tiles.grid, kThreads, 0, stream>>>(
          sc.data_ptr<scalar_t>(), order.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), out.data_ptr<scalar_t>(),
          static_cast<int>(L), static_cast<int>(M), B * L, static_cast<int>(D / VEC), tiles.block_rows);
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
  check_int32("shuffle_with_mask_tokens", "n (slots per sample)", n);
  check_int32("shuffle_with_mask_tokens", "D (features per row)", D, kMaxRowVecs);
  auto out = at::empty({B, n, D}, vc.options());
  if (out.numel() == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, vc.scalar_type(), "shuffle_tokens_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto launch = [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      const auto tiles = row_tiles(B * n, D / VEC);
      shuffle_fwd_kernel<scalar_t, VEC><<<tiles.grid, kThreads, 0, stream>>>(
          vc.data_ptr<scalar_t>(), pc.data_ptr<int64_t>(), me.data_ptr<acc_t>(), pe.data_ptr<acc_t>(),
          out.data_ptr<scalar_t>(), static_cast<int>(m), static_cast<int>(n), B * n, static_cast<int>(D / VEC),
          tiles.block_rows);
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
  check_int32("patchify_gather", "H*W*3 (elements per frame)", H * W * 3);
  check_int32("patchify_gather", "K (patches per frame)", K);
  auto out = at::empty({B, T, K, F}, vc.options().dtype(patchify_out_type(vc.scalar_type())));
  if (out.numel() == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto tiles = row_tiles(B * T * K, (F + 3) / 4);
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, vc.scalar_type(), "patchify_gather_cuda", [&] {
    using out_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    auto launch = [&](auto vec_out) {
      patchify_gather_kernel<scalar_t, out_t, decltype(vec_out)::value><<<tiles.grid, kThreads, 0, stream>>>(
          vc.data_ptr<scalar_t>(), pc.data_ptr<int64_t>(), out.data_ptr<out_t>(), B * T * K, static_cast<int>(K),
          static_cast<int>(N), static_cast<int>(NW), static_cast<int>(P), static_cast<int>(W * 3), H * W * 3,
          tiles.block_rows);
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
