// CUDA kernels of the token ops (the "cuda" backend). Memory-bound: every kernel
// reads and writes each byte once, with 16-byte vector accesses wherever the row
// length and the pointers allow (otherwise the same kernels at a narrower width).
//
// Row kernels (gather, scatter's second pass, shuffle forward) move a tile of whole rows
// per block: a block of kThreads threads owns `block_rows` output rows, about kTileVecs
// vectors (32 KB at 16 bytes). Its first threads resolve the source row of each of its
// rows (one coalesced index load) into shared memory; then the tile's vectors, flattened
// row-major, are spread over the threads, consecutive threads on consecutive vectors
// (row and column tracked incrementally, no division per vector), and each thread issues
// kUnroll loads before its kUnroll stores. So a D=768 bf16 row (96 vectors) keeps every
// lane busy, each thread has 64 bytes in flight, and the grid is a few thousand blocks
// instead of one tiny block per row (which left threads idle and was bound by per-block
// latency at these ~100 MB sizes). Patchify stages runs of pixels in shared memory and
// writes a contiguous output range; the shuffle backward walks the batch per slot block.
// Index values are checked in the kernels with device asserts (CUDA_KERNEL_ASSERT, on
// in release builds, as torch's own index kernels do): free for these memory-bound
// kernels, where a separate checking pass would cost a quarter of the op. Math:
// kernels/<op>.py.
//
// Bytes and floors below: E = element size of the tokens, Ea = 4 (fp32 sums and
// embeddings; 8 for fp64); the floor is bytes / copy bandwidth (read + write), quoted at
// VideoPrism-B stage 2 (B=32, m = M = 1440 of n = L = 4096 tokens, D=768, bf16; patchify
// K=90, P=18, T=16) on an H200 (copy 4218 GB/s, the figure of the Triton docstrings), index
// bytes left out of the floor (under 1%). Where a kernel moves what its Triton twin moves,
// the formula is cited from that docstring; differences are stated.
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

// Row and column of element e = row*len + col of a row-major tile, this thread's e
// starting at threadIdx.x and advancing by kThreads without a division (a runtime integer
// division per vector was a large share of the instructions of these copy loops).
struct TileCursor {
  int row, col, len, step_row, step_col;
  __device__ __forceinline__ explicit TileCursor(int len_)
      : row(static_cast<int>(threadIdx.x) / len_),
        col(static_cast<int>(threadIdx.x) - row * len_),
        len(len_),
        step_row(kThreads / len_),
        step_col(kThreads - step_row * len_) {}
  __device__ __forceinline__ void advance() {
    row += step_row, col += step_col;
    if (col >= len) col -= len, ++row;
  }
};

// Walks the tile's count*row_vecs vectors: load(lr, c) for kUnroll vectors (lr the row in
// the tile, c the vector in the row), then store(lr, c, loaded) for the same ones, so the
// loads of a thread are in flight together. Needs blockDim.x == kThreads.
template <typename Load, typename Store>
__device__ __forceinline__ void for_tile_vecs(int count, int row_vecs, Load load, Store store) {
  using V = decltype(load(0, 0));
  const int total = count * row_vecs;
  TileCursor at(row_vecs);
  for (int e0 = threadIdx.x; e0 < total; e0 += kThreads * kUnroll) {
    V v[kUnroll];
    int lr[kUnroll], c[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      lr[u] = at.row, c[u] = at.col;
      if (e0 + u * kThreads < total) v[u] = load(lr[u], c[u]);
      at.advance();
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (e0 + u * kThreads < total) store(lr[u], c[u], v[u]);
  }
}

// ---- gather: out[r] = x[b, idx[r]], r = b*M + j; a byte copy, V is the copy unit.
// Layout: x [B, L, D], idx [B, M] int64, out [B, M, D], all contiguous (the host makes them
// so); a block owns block_rows consecutive output rows. Bytes as kernels/gather_tokens.py:
// B*M*D*E read + B*M*D*E written (+ 8*B*M index bytes): 141.6 MB -> floor 33.6 us.
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

// ---- scatter, pass 1: thread per index r = b*M + j; table[0][b*L + l] = max(M - j) and
// table[1][b*L + l] = max(j + 1) over the j with idx[b, j] = l (a zeroed int32 [2, B*L]
// table): the first and last source of every output row, deterministic.
// Layout: idx [B, M] int64 contiguous, table int32 [2, B*L] (zeroed by the host: at::zeros,
// 8*B*L bytes written). Bytes: 8*B*M index bytes read, at most 8*B*M of table atomics (hits
// in L2): 0.4 MB + 1 MB at stage 2, a few tenths of a microsecond: launch-bound, not
// bandwidth-bound.
__global__ void scatter_sources_kernel(const int64_t* __restrict__ idx, int* __restrict__ table, int L, int M,
                                       int64_t n_idx, int64_t n_rows) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= n_idx) return;
  const int64_t l = idx[r];
  CUDA_KERNEL_ASSERT(l >= 0 && l < L && "scatter_tokens: idx value out of range [0, L)");
  if (l < 0 || l >= L) return;
  const int64_t b = r / M;
  const int j = static_cast<int>(r - b * M);
  atomicMax(table + b * L + l, M - j);
  atomicMax(table + n_rows + b * L + l, j + 1);
}

// ---- scatter, pass 2: out[r], r = b*L + l, from the table. The tile writes the rows with at
// most one source as gather does (zeros or a copy: the masking case, unique indices); a
// row with several sources is summed afterwards by the block, in ascending j (the first
// source, then a scan of idx[b, first+1..last] for l), so the tile loop stays as lean as
// gather's. 5 blocks per SM: 48 registers (64 without the bound); the few spills it costs
// are in the duplicate path.
// Layout: src [B, M, D], idx [B, M] int64, out [B, L, D] contiguous; table from pass 1. Bytes
// as kernels/gather_tokens.py (scatter): B*M*D*E read + B*L*D*E written (+ 8*B*L table
// reads): 272.1 MB -> floor 64.5 us. A row with several sources re-reads idx[b, first..last]
// (per column thread: broadcasts from L1/L2) as the Triton duplicate scan does; its extra
// source rows are the B*M*D*E counted once in total.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, 5)
    scatter_rows_kernel(const T* __restrict__ src, const int64_t* __restrict__ idx, const int* __restrict__ table,
                        T* __restrict__ out, int L, int M, int64_t rows, int row_vecs, int block_rows) {
  using acc_t = at::opmath_type<T>;
  using P = Pack<T, VEC>;
  __shared__ int64_t first_row[kMaxBlockRows];  // b*M + the first source; -1 for a row without one
  __shared__ int dup_last[kMaxBlockRows];       // the last source j of a row with several; -1 otherwise
  const Tile t = block_tile(rows, block_rows);
  bool dup = false;
  for (int lr = threadIdx.x; lr < t.count; lr += kThreads) {
    const int64_t r = t.row0 + lr, b = r / L;
    const int first = M - table[r], last = table[rows + r] - 1;  // first = M, last = -1: no source
    first_row[lr] = last >= 0 ? b * M + first : -1;
    dup_last[lr] = first < last ? last : -1;
    dup |= first < last;
  }
  dup = __syncthreads_or(dup);
  const P* s = reinterpret_cast<const P*>(src);
  P* dst = reinterpret_cast<P*>(out) + t.row0 * row_vecs;
  for_tile_vecs(
      t.count, row_vecs,
      [&](int lr, int c) {
        const int64_t f = first_row[lr];
        return f >= 0 && dup_last[lr] < 0 ? s[f * row_vecs + c] : P{};
      },
      [&](int lr, int c, const P& v) {
        if (dup_last[lr] < 0) dst[static_cast<int64_t>(lr) * row_vecs + c] = v;
      });
  if (!dup) return;
  for (int lr = 0; lr < t.count; ++lr) {  // block-uniform: the tables are shared
    const int last = dup_last[lr];
    if (last < 0) continue;
    const int64_t r = t.row0 + lr, b = r / L, l = r - b * L, f = first_row[lr];
    for (int c = threadIdx.x; c < row_vecs; c += kThreads) {
      const P v0 = s[f * row_vecs + c];
      acc_t acc[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[e] = static_cast<acc_t>(v0.v[e]);
      for (int64_t j = f + 1; j <= b * M + last; ++j) {  // all threads read the same index: a broadcast
        if (idx[j] != l) continue;
        const P v = s[j * row_vecs + c];
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[e] += static_cast<acc_t>(v.v[e]);
      }
      P w;
#pragma unroll
      for (int e = 0; e < VEC; ++e) w.v[e] = static_cast<T>(acc[e]);
      dst[static_cast<int64_t>(lr) * row_vecs + c] = w;
    }
  }
}

// ---- shuffle forward: out[b*n + i] = (visible[b, p] or mask_emb) + pos_emb[i], p = perm[b*n + i].
// Tile rows t = i*B + b in slot-major order: a tile's rows share one or a few slots, so
// pos_emb rows are read once from L2 and then hit L1 (b-major tiles pulled the fp32
// [n, D] table through L2 once per sample: 403 MB at stage 2, more than the 285 MB the op
// moves). Only the token and pos_emb vectors are loaded in the load phase; mask_emb (one
// L1-resident row) is read in the store phase: the earlier kernel held all three, 80 bytes
// per vector, and its 128 registers per thread left 2 blocks per SM.
// Layout: visible [B, m, D], perm [B, n] int64, mask_emb [D] and pos_emb [n, D] in the
// accumulation type (Ea), out [B, n, D], all contiguous. Bytes as kernels/shuffle_tokens.py
// (forward): B*m*D*E + (n*D + D)*Ea read, B*n*D*E written (+ 8*B*n index bytes): 284.7 MB
// -> floor 67.5 us.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    shuffle_fwd_kernel(const T* __restrict__ vis, const int64_t* __restrict__ perm,
                       const at::opmath_type<T>* __restrict__ mask_emb, const at::opmath_type<T>* __restrict__ pos_emb,
                       T* __restrict__ out, int B, int m, int n, int64_t rows, int row_vecs, int block_rows) {
  using acc_t = at::opmath_type<T>;
  using P = Pack<T, VEC>;
  using A = Pack<acc_t, VEC>;
  __shared__ int64_t src_row[kMaxBlockRows];  // visible row b*m + p, or -1 for a mask slot
  __shared__ int64_t dst_row[kMaxBlockRows];  // b*n + i
  __shared__ int slot[kMaxBlockRows];
  const Tile t = block_tile(rows, block_rows);
  for (int lr = threadIdx.x; lr < t.count; lr += kThreads) {
    const int64_t tr = t.row0 + lr, i = tr / B, b = tr - i * B, r = b * n + i, p = perm[r];
    CUDA_KERNEL_ASSERT(p >= 0 && p < n && "shuffle_with_mask_tokens: perm value out of range [0, n)");
    src_row[lr] = (p >= 0 && p < m) ? b * m + p : -1;
    dst_row[lr] = r;
    slot[lr] = static_cast<int>(i);
  }
  __syncthreads();
  const P* v = reinterpret_cast<const P*>(vis);
  const A* pos = reinterpret_cast<const A*>(pos_emb);
  const A* me = reinterpret_cast<const A*>(mask_emb);
  P* dst = reinterpret_cast<P*>(out);
  for_tile_vecs(
      t.count, row_vecs,
      [&](int lr, int c) {
        const int64_t sr = src_row[lr];
        return sr >= 0 ? v[sr * row_vecs + c] : P{};
      },
      [&](int lr, int c, const P& token) {
        const A pe = pos[static_cast<int64_t>(slot[lr]) * row_vecs + c];
        P w;
        if (src_row[lr] >= 0) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) w.v[e] = static_cast<T>(static_cast<acc_t>(token.v[e]) + pe.v[e]);
        } else {
          const A mk = me[c];
#pragma unroll
          for (int e = 0; e < VEC; ++e) w.v[e] = static_cast<T>(mk.v[e] + pe.v[e]);
        }
        dst[dst_row[lr] * row_vecs + c] = w;
      });
}

// ---- shuffle backward: block (slot block, column block); each thread owns VEC columns
// of kSlots consecutive slots and walks the batch kSamples samples at a time (reductions
// without atomics, in ascending b). All kSamples*kSlots row loads and their perm values are
// issued before any is used: the earlier kernel asserted each perm value (a possible
// trap) between its loads, so the compiler could not issue a load before the previous
// check, and it had one sample in flight (36% of copy bandwidth at stage 2).
// Layout: grad [B, n, D], perm [B, n] int64 contiguous -> gvis [B, m, D] (grad's type), gpos
// [n, D] and part [ceil(n / kSlots), D] in Ea; grid (slot block, column block), one VEC-wide
// column per thread. Bytes: kernels/shuffle_tokens.py's backward (B*n*D*E read, B*m*D*E +
// n*D*Ea written, + 8*B*n index bytes) plus the mask-embedding partial rows, which differ:
// kSlots = 4 slots per block (Triton: 16) gives n/4 partial rows of D*Ea, written here and
// read back by the host's part.sum(0): 2*(n/kSlots)*D*Ea = 6.3 MB at stage 2 (Triton 1.6 MB).
// 291.0 MB -> floor 69.0 us (Triton's 284.7 + 1.6 MB: 67.9 us). A perm value outside
// [0, n) (asserted) goes into neither d visible nor d mask_emb, as in the Triton kernel.
constexpr int kSlots = 4;
constexpr int kSamples = 2;
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
  for (int64_t b0 = 0; b0 < B; b0 += kSamples) {
    P v[kSamples][kSlots];
    int64_t p[kSamples][kSlots];
#pragma unroll
    for (int k = 0; k < kSamples; ++k) {
#pragma unroll
      for (int s = 0; s < kSlots; ++s) {
        const int64_t row = (b0 + k) * n + i0 + s;
        const bool ok = b0 + k < B && s < slots;
        v[k][s] = ok ? g[row * row_vecs + c] : P{};
        p[k][s] = ok ? perm[row] : 0;
      }
    }
#pragma unroll
    for (int k = 0; k < kSamples; ++k) {
#pragma unroll
      for (int s = 0; s < kSlots; ++s) {
        if (b0 + k >= B || s >= slots) continue;
        const int64_t ps = p[k][s];
        CUDA_KERNEL_ASSERT(ps >= 0 && ps < n && "shuffle_with_mask_tokens: perm value out of range [0, n)");
#pragma unroll
        for (int e = 0; e < VEC; ++e) pacc[s].v[e] += static_cast<acc_t>(v[k][s].v[e]);
        if (ps >= 0 && ps < m) {
          gv[((b0 + k) * m + ps) * row_vecs + c] = v[k][s];
        } else if (ps >= m && ps < n) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) macc.v[e] += static_cast<acc_t>(v[k][s].v[e]);
        }
      }
    }
  }
#pragma unroll
  for (int s = 0; s < kSlots; ++s)
    if (s < slots) reinterpret_cast<A*>(gpos)[(i0 + s) * row_vecs + c] = pacc[s];
  reinterpret_cast<A*>(part)[blockIdx.x * row_vecs + c] = macc;
}

// ---- patchify. A patch's output row is its P pixel-row runs of run = 3P input elements
// (54 bytes of uint8 at P = 18) back to back, so run q = r*P + p of patch r lands at
// out[q*run, (q+1)*run) and a tile of consecutive runs is one contiguous output range.
// A block stages its tile of tile_runs runs in shared memory (the run starts resolved
// first, one division each), then converts and writes the whole range with 16-byte
// stores, consecutive threads on consecutive vectors: no per-element index division and
// no partial stores (the earlier kernel did two runtime divisions per 4 features). The
// staging reads are element loads, kStageUnroll in flight per thread, coalesced along
// each run. tile_runs is a multiple of 4 when it can be, so each tile starts 16-byte aligned.
// Layout: video [B, T, H, W, 3] channels last, pos [B, T, K] int64, out [B, T, K, P*P*3] fp32
// (fp64 for fp64), all contiguous. Bytes as kernels/patchify_gather.py: B*T*K*P*P*3 *
// (E_in + E_out) (+ 8*B*T*K index bytes): 223.9 MB (uint8 -> fp32) -> floor 53.1 us; the
// 54-byte runs are not 32-byte-sector aligned, so DRAM reads exceed the 44.8 MB of uint8
// counted (a run spans 2 or 3 sectors: at worst 96/54 = 1.8x). Shared memory: tile_runs * 3P * E_in.
constexpr int kStageUnroll = 8;
constexpr int kMaxTileRuns = 512;    // run-start table size
constexpr int kPatchTileElems = 8192;
constexpr int kMaxStageBytes = 32768;

template <typename In>
__host__ __device__ __forceinline__ auto patch_value(In v) {
  if constexpr (std::is_same_v<In, uint8_t>) {
    return static_cast<float>(v) * (1.0f / 255.0f);  // the one rounding every backend does
  } else if constexpr (std::is_same_v<In, double>) {
    return v;
  } else {
    return static_cast<float>(v);
  }
}

template <typename In, bool VEC_OUT>
__global__ void __launch_bounds__(kThreads)
    patchify_gather_kernel(const In* __restrict__ video, const int64_t* __restrict__ pos,
                           decltype(patch_value(In{}))* __restrict__ out, int64_t n_runs, int K, int N, int NW, int P,
                           int row_stride, int64_t frame_stride, int tile_runs) {
  using Out = decltype(patch_value(In{}));
  __shared__ int64_t run_start[kMaxTileRuns];  // the run's first element; -1 for pos out of range (asserted)
  extern __shared__ __align__(32) unsigned char stage_bytes[];  // tile_runs * run elements of In
  In* stage = reinterpret_cast<In*>(stage_bytes);
  const int run = 3 * P;
  const int64_t q0 = static_cast<int64_t>(blockIdx.x) * tile_runs;
  const int count = static_cast<int>(n_runs - q0 < tile_runs ? n_runs - q0 : tile_runs);
  for (int lq = threadIdx.x; lq < count; lq += kThreads) {
    const int64_t q = q0 + lq, r = q / P, nidx = pos[r];
    CUDA_KERNEL_ASSERT(nidx >= 0 && nidx < N && "patchify_gather: pos value out of range [0, N)");
    const int ni = static_cast<int>(nidx), p = static_cast<int>(q - r * P);
    run_start[lq] = (nidx >= 0 && nidx < N)
                        ? (r / K) * frame_stride + static_cast<int64_t>((ni / NW) * P + p) * row_stride + (ni % NW) * run
                        : -1;
  }
  __syncthreads();
  const int total = count * run;
  TileCursor at(run);  // element e = run index * run + offset in the run
  for (int e0 = threadIdx.x; e0 < total; e0 += kThreads * kStageUnroll) {
    In v[kStageUnroll];
#pragma unroll
    for (int k = 0; k < kStageUnroll; ++k) {
      const int64_t start = e0 + k * kThreads < total ? run_start[at.row] : -1;
      v[k] = start >= 0 ? video[start + at.col] : In{};
      at.advance();
    }
#pragma unroll
    for (int k = 0; k < kStageUnroll; ++k)
      if (e0 + k * kThreads < total) stage[e0 + k * kThreads] = v[k];
  }
  __syncthreads();
  Out* dst = out + q0 * run;
  int e = threadIdx.x;
  if constexpr (VEC_OUT) {
    const auto* in4 = reinterpret_cast<const Pack<In, 4>*>(stage);
    for (int v = threadIdx.x; v < total / 4; v += kThreads) {
      const Pack<In, 4> x = in4[v];
      Pack<Out, 4> w;
#pragma unroll
      for (int k = 0; k < 4; ++k) w.v[k] = patch_value(x.v[k]);
      reinterpret_cast<Pack<Out, 4>*>(dst)[v] = w;
    }
    e += total / 4 * 4;  // the last tile's tail
  }
  for (; e < total; e += kThreads) dst[e] = patch_value(stage[e]);
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
  // First and last source of every output row (1 MB at stage 2 instead of a sort of the indices).
  auto table = at::zeros({2, B * L}, ic.options().dtype(at::kInt));
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (M > 0) {
    constexpr int kSourceThreads = 256;
    scatter_sources_kernel<<<static_cast<unsigned>((B * M + kSourceThreads - 1) / kSourceThreads), kSourceThreads, 0,
                             stream>>>(ic.data_ptr<int64_t>(), table.data_ptr<int>(), static_cast<int>(L),
                                       static_cast<int>(M), B * M, B * L);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sc.scalar_type(), "scatter_tokens_cuda", [&] {
    auto launch = [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      const auto tiles = row_tiles(B * L, D / VEC);
      scatter_rows_kernel<scalar_t, VEC><<<tiles.grid, kThreads, 0, stream>>>(
          sc.data_ptr<scalar_t>(), ic.data_ptr<int64_t>(), table.data_ptr<int>(), out.data_ptr<scalar_t>(),
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
  // Named copies, not structured bindings: lambdas capture them below (C++20 for bindings).
  const auto dims = check_shuffle_fwd(visible, perm, mask_emb, pos_emb);
  const int64_t B = dims[0], m = dims[1], n = dims[2], D = dims[3];
  c10::cuda::CUDAGuard guard(visible.device());
  auto vc = visible.contiguous();
  auto pc = perm.contiguous();
  const auto acc = acc_type(vc.scalar_type());
  auto me = mask_emb.to(acc).contiguous();
  auto pe = pos_emb.to(acc).contiguous();
  check_int32("shuffle_with_mask_tokens", "n (slots per sample)", n);
  check_int32("shuffle_with_mask_tokens", "B (samples)", B);
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
          out.data_ptr<scalar_t>(), static_cast<int>(B), static_cast<int>(m), static_cast<int>(n), B * n,
          static_cast<int>(D / VEC), tiles.block_rows);
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
        const int64_t col_blocks = (row_vecs + tx - 1) / tx;
        TORCH_CHECK(col_blocks <= 65535, "shuffle_with_mask_tokens backward: rows of D = ", D,
                    " features take more column blocks than CUDA's grid.y allows (65535); use backend='triton'");
        const dim3 grid(static_cast<unsigned>(n_blocks), static_cast<unsigned>(col_blocks));
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
  const auto dims = check_patchify(video, pos, P);  // named copies: the lambdas below capture them
  const int64_t B = dims[0], T = dims[1], H = dims[2], W = dims[3], K = dims[4];
  c10::cuda::CUDAGuard guard(video.device());
  auto vc = video.contiguous();
  auto pc = pos.contiguous();
  const int64_t F = P * P * 3, NW = W / P, N = (H / P) * NW;
  check_int32("patchify_gather", "H*W*3 (elements per frame)", H * W * 3);
  check_int32("patchify_gather", "K (patches per frame)", K);
  auto out = at::empty({B, T, K, F}, vc.options().dtype(acc_type(vc.scalar_type())));
  if (out.numel() == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t run = 3 * P, n_runs = B * T * K * P;
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, vc.scalar_type(), "patchify_gather_cuda", [&] {
    using out_t = decltype(patch_value(scalar_t{}));
    const int64_t run_bytes = run * static_cast<int64_t>(sizeof(scalar_t));
    TORCH_CHECK(run_bytes <= kMaxStageBytes, "patchify_gather: a pixel row of a patch (3P = ", run, " elements of ",
                vc.scalar_type(), ") must fit the ", kMaxStageBytes / 1024,
                " KB staging buffer of the CUDA kernel; use backend='triton'");
    int64_t tile_runs = std::min<int64_t>({kMaxTileRuns, kPatchTileElems / run, kMaxStageBytes / run_bytes});
    tile_runs = tile_runs >= 4 ? tile_runs / 4 * 4 : 1;
    const size_t smem = static_cast<size_t>(tile_runs * run_bytes);
    const dim3 grid(static_cast<unsigned>((n_runs + tile_runs - 1) / tile_runs));
    auto launch = [&](auto vec_out) {
      patchify_gather_kernel<scalar_t, decltype(vec_out)::value><<<grid, kThreads, smem, stream>>>(
          vc.data_ptr<scalar_t>(), pc.data_ptr<int64_t>(), out.data_ptr<out_t>(), n_runs, static_cast<int>(K),
          static_cast<int>(N), static_cast<int>(NW), static_cast<int>(P), static_cast<int>(W * 3), H * W * 3,
          static_cast<int>(tile_runs));
    };
    // Vector stores when every tile starts on a 4-element boundary of an aligned output.
    if (tile_runs * run % 4 == 0 && aligned(out.data_ptr(), 4 * sizeof(out_t))) {
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
