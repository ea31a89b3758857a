// CPU kernels of the token ops (the "cpp" backend). Each is one pass over the bytes:
// rows are split over threads by at::parallel_for (with OpenMP: setup.py); a row that is a pure copy goes
// through memcpy, converting rows through simple loops over contiguous data that the
// compiler vectorises (-O3). Math and layouts: kernels/<op>.py.
//
// Every kernel takes contiguous copies of its inputs (free when they already are) and
// writes a contiguous output. Bytes per op are those of the Triton docstrings (E = element
// size, Ea = 4, 8 for fp64), differences stated at each kernel; the floor is bytes / the
// CPU's copy bandwidth (read + write) that bench.token_ops measures in the same run
// (copy_gbps in bench/results/token_ops_cpu.json: 29.8 GB/s on the 2-core CI machine, 2 threads). At
// its CPU shapes (B=2, fp32, D=768, stage 2: m = 1440 of n = 4096) that is e.g. gather
// 2*B*m*D*4 = 17.7 MB -> 0.59 ms.
#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "token_ops.h"

namespace videoprism {
namespace {

constexpr int64_t kRowGrain = 64;  // rows per parallel_for task: amortises scheduling

// dst[d] = Out(src[d]) for d < n (a copy when the types match).
template <typename Out, typename In>
inline void convert_row(Out* dst, const In* src, int64_t n) {
  if constexpr (std::is_same_v<Out, In>) {
    std::memcpy(dst, src, n * sizeof(Out));
  } else {
    for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<Out>(src[d]);
  }
}

// One pixel run of a patch: floats converted, uint8 scaled by fp32(1/255) with one fp32
// multiply (the one rounding every backend does). __restrict__: uint8_t may alias
// anything, so without it the compiler does not vectorise the loops.
template <typename Out, typename In>
inline void patch_row(Out* dst, const In* src, int64_t n) {
  convert_row(dst, src, n);
}
constexpr float kUint8Scale = 1.0f / 255.0f;
constexpr int64_t kU8Block = 16;  // one 16-byte load; the compiler emits whole vectors, no remainder loop
inline void u8_block(float* __restrict__ dst, const uint8_t* __restrict__ src) {
  for (int64_t u = 0; u < kU8Block; ++u) dst[u] = static_cast<float>(src[u]) * kUint8Scale;
}
// Runs are 3P bytes, rarely a multiple of 16 (P = 18: 54 = 3*16 + 6): a plain loop left the last
// 6 values of every run to a scalar remainder. The last block instead ends at the run's end,
// overlapping the one before: the overlapped values are written twice with the same result
// (alone: 1.07-1.18x on the uint8 kernel at the bench's shapes, cores shared with other jobs).
inline void patch_row(float* __restrict__ dst, const uint8_t* __restrict__ src, int64_t n) {
  if (n < kU8Block) {
    for (int64_t u = 0; u < n; ++u) dst[u] = static_cast<float>(src[u]) * kUint8Scale;
    return;
  }
  int64_t u = 0;
  for (; u + kU8Block <= n; u += kU8Block) u8_block(dst + u, src + u);
  if (u < n) u8_block(dst + n - kU8Block, src + n - kU8Block);
}

// Asks for the P runs of a later patch (`bytes` each, `stride` bytes apart) to be brought into
// the caches. A uint8 patch reads P short runs one image row apart (P = 18, 288 wide: 54 bytes
// every 864) and the next visible patch lies elsewhere: the hardware prefetchers did not bring
// them in time, and every run's first load waited for memory (perf: most samples of the uint8
// kernel on the instruction after that load). With the blocks above, the uint8 kernel at the
// bench's shapes (B = 2, 2 cores) took 1.4-2.7x less time at stage 1 (random tube mask) on a
// quiet machine, 2.3-2.9x with the cores shared; 1.0-1.2x at stage 2, whose BEVT blocks put
// neighbouring patches next to each other (shared lines, reads nearly in order). For fp32 video
// (216-byte runs) the prefetch measured 0.73-0.99x: uint8 only. The caller passes only patches
// inside the video.
inline void prefetch_runs(const char* src, int64_t bytes, int64_t stride, int64_t P) {
#if defined(__GNUC__) || defined(__clang__)
  for (int64_t p = 0; p < P; ++p, src += stride) {
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(src + b);  // 64: the cache line
    __builtin_prefetch(src + bytes - 1);  // the line the run ends in, when it straddles one more
  }
#endif
}
// How many patches ahead to prefetch: 1, 2, 4 and 8 measured within noise of one another; 2
// leaves slack when a patch converts faster than its successor's lines arrive.
constexpr int64_t kPatchPrefetch = 2;

}  // namespace

// gather: x [B, L, D], idx [B, M] -> out [B, M, D]; one memcpy of D*E bytes per output row.
// Bytes as kernels/gather_tokens.py: 2*B*M*D*E (+ 8*B*M index bytes).
at::Tensor gather_tokens_cpu(const at::Tensor& x, const at::Tensor& idx) {
  check_tokens("gather_tokens", "x", x);
  check_index("gather_tokens", "idx", idx, x, -1);
  auto xc = x.contiguous();
  auto ic = idx.contiguous();
  const int64_t B = xc.size(0), L = xc.size(1), D = xc.size(2), M = ic.size(1);
  auto out = at::empty({B, M, D}, xc.options());
  const int64_t row_bytes = D * xc.element_size();
  const char* src = static_cast<const char*>(xc.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  const int64_t* ip = ic.data_ptr<int64_t>();
  at::parallel_for(0, B * M, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t j = ip[r];
      TORCH_CHECK(j >= 0 && j < L, "gather_tokens: idx value ", j, " out of range [0, ", L, ")");
      std::memcpy(dst + r * row_bytes, src + ((r / M) * L + j) * row_bytes, row_bytes);
    }
  });
  return out;
}

// scatter: src [B, M, D], idx [B, M] -> out [B, L, D]. Differs from the GPU kernels' first/last
// table: a CSR per sample by a counting sort (offsets [B, L+1] and order [B, M] int64, built
// with idx read twice: about 8*(2*B*M + 2*B*(L+1)) bytes, cache-resident at these sizes), then
// each output row once: zeros (memset), a memcpy, or the sources summed in ascending j in Ea.
// Token bytes as kernels/gather_tokens.py: B*M*D*E read + B*L*D*E written.
at::Tensor scatter_tokens_cpu(const at::Tensor& src, const at::Tensor& idx, int64_t length) {
  check_tokens("scatter_tokens", "src", src);
  check_float("scatter_tokens", "src", src);
  check_index("scatter_tokens", "idx", idx, src, src.size(1));
  TORCH_CHECK(length >= 0, "scatter_tokens: length must be >= 0, got ", length);
  auto sc = src.contiguous();
  auto ic = idx.contiguous();
  const int64_t B = sc.size(0), M = sc.size(1), D = sc.size(2), L = length;
  auto out = at::empty({B, L, D}, sc.options());
  // CSR per sample by a counting sort (stable: sources of a row are summed in ascending j).
  std::vector<int64_t> offsets(B * (L + 1), 0), order(B * M);
  const int64_t* ip = ic.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t* off = offsets.data() + b * (L + 1);
      const int64_t* row = ip + b * M;
      for (int64_t j = 0; j < M; ++j) {
        TORCH_CHECK(row[j] >= 0 && row[j] < L, "scatter_tokens: idx value ", row[j], " out of range [0, ", L, ")");
        ++off[row[j] + 1];
      }
      for (int64_t l = 0; l < L; ++l) off[l + 1] += off[l];
      std::vector<int64_t> next(off, off + L);
      for (int64_t j = 0; j < M; ++j) order[b * M + next[row[j]]++] = j;
    }
  });
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sc.scalar_type(), "scatter_tokens_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* s = sc.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * L, kRowGrain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(D);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / L, l = r % L;
        const int64_t lo = offsets[b * (L + 1) + l], hi = offsets[b * (L + 1) + l + 1];
        scalar_t* dst = o + r * D;
        if (hi == lo) {
          std::memset(dst, 0, D * sizeof(scalar_t));  // all-zero bits are +0.0 in every float type
        } else if (hi == lo + 1) {
          std::memcpy(dst, s + (b * M + order[b * M + lo]) * D, D * sizeof(scalar_t));
        } else {
          std::fill(acc.begin(), acc.end(), acc_t(0));
          for (int64_t q = lo; q < hi; ++q) {
            const scalar_t* row = s + (b * M + order[b * M + q]) * D;
            for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<acc_t>(row[d]);
          }
          convert_row(dst, acc.data(), D);
        }
      }
    });
  });
  return out;
}

// shuffle forward: visible [B, m, D], perm [B, n], mask_emb [D], pos_emb [n, D] -> out [B, n, D],
// rows in b-major order (pos_emb rows re-read per sample: from the CPU caches at these sizes).
// Bytes as kernels/shuffle_tokens.py: B*m*D*E + (n*D + D)*Ea read, B*n*D*E written (+ 8*B*n).
at::Tensor shuffle_tokens_fwd_cpu(const at::Tensor& visible, const at::Tensor& perm, const at::Tensor& mask_emb,
                                  const at::Tensor& pos_emb) {
  // Named copies, not structured bindings: lambdas capture them below (C++20 for bindings).
  const auto dims = check_shuffle_fwd(visible, perm, mask_emb, pos_emb);
  const int64_t B = dims[0], m = dims[1], n = dims[2], D = dims[3];
  auto vc = visible.contiguous();
  auto pc = perm.contiguous();
  const auto acc = acc_type(vc.scalar_type());
  // The embeddings are [D] and [n, D]: bringing them to the accumulation type up front is
  // free when they already are (fp32 parameters) and small otherwise.
  auto me = mask_emb.to(acc).contiguous();
  auto pe = pos_emb.to(acc).contiguous();
  auto out = at::empty({B, n, D}, vc.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, vc.scalar_type(), "shuffle_tokens_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* v = vc.data_ptr<scalar_t>();
    const acc_t* mp = me.data_ptr<acc_t>();
    const acc_t* pp = pe.data_ptr<acc_t>();
    const int64_t* ip = pc.data_ptr<int64_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * n, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / n, i = r % n, p = ip[r];
        TORCH_CHECK(p >= 0 && p < n, "shuffle_with_mask_tokens: perm value ", p, " out of range [0, ", n, ")");
        const acc_t* pos = pp + i * D;
        scalar_t* dst = o + r * D;
        if (p < m) {
          const scalar_t* src = v + (b * m + p) * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(static_cast<acc_t>(src[d]) + pos[d]);
        } else {
          for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(mp[d] + pos[d]);
        }
      }
    });
  });
  return out;
}

// shuffle backward: grad [B, n, D], perm [B, n] -> (d visible [B, m, D], d mask_emb [D], d pos_emb
// [n, D]); a task owns kSlots = 16 slots and walks the batch. Bytes as kernels/shuffle_tokens.py's
// backward (B*n*D*E read, B*m*D*E + n*D*Ea written, + 8*B*n) plus the partial mask-embedding
// rows: ceil(n/16)*D*Ea zeroed, accumulated and read back by part.sum(0) (as Triton's 16-slot blocks).
std::tuple<at::Tensor, at::Tensor, at::Tensor> shuffle_tokens_bwd_cpu(const at::Tensor& grad, const at::Tensor& perm,
                                                                      int64_t m) {
  check_shuffle_bwd(grad, perm, m);
  auto gc = grad.contiguous();
  auto pc = perm.contiguous();
  const int64_t B = gc.size(0), n = gc.size(1), D = gc.size(2);
  const auto acc = acc_type(gc.scalar_type());
  auto gvis = at::empty({B, m, D}, gc.options());
  auto gpos = at::empty({n, D}, gc.options().dtype(acc));
  // One partial mask-embedding row per block of kSlots slots, summed in block order
  // afterwards: deterministic whatever the thread count.
  constexpr int64_t kSlots = 16;
  const int64_t n_blocks = (n + kSlots - 1) / kSlots;
  auto part = at::zeros({n_blocks, D}, gc.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gc.scalar_type(), "shuffle_tokens_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = gc.data_ptr<scalar_t>();
    const int64_t* ip = pc.data_ptr<int64_t>();
    scalar_t* gv = gvis.data_ptr<scalar_t>();
    acc_t* gp = gpos.data_ptr<acc_t>();
    acc_t* pt = part.data_ptr<acc_t>();
    at::parallel_for(0, n_blocks, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        acc_t* mrow = pt + k * D;
        for (int64_t i = k * kSlots; i < std::min(n, (k + 1) * kSlots); ++i) {
          acc_t* prow = gp + i * D;
          std::fill(prow, prow + D, acc_t(0));
          // Walk the batch for slot i: the pos_emb row stays in L1 while B rows stream by.
          for (int64_t b = 0; b < B; ++b) {
            const int64_t p = ip[b * n + i];
            TORCH_CHECK(p >= 0 && p < n, "shuffle_with_mask_tokens: perm value ", p, " out of range [0, ", n, ")");
            const scalar_t* row = g + (b * n + i) * D;
            for (int64_t d = 0; d < D; ++d) prow[d] += static_cast<acc_t>(row[d]);
            if (p < m) {
              std::memcpy(gv + (b * m + p) * D, row, D * sizeof(scalar_t));
            } else {
              for (int64_t d = 0; d < D; ++d) mrow[d] += static_cast<acc_t>(row[d]);
            }
          }
        }
      }
    });
  });
  return {gvis, part.sum(0), gpos};
}

// patchify: video [B, T, H, W, 3], pos [B, T, K] -> out [B, T, K, P*P*3] (acc_type: fp32, fp64 for
// fp64); a patch is P runs of 3P contiguous input elements (row stride 3W), converted by
// patch_row; for uint8 video the runs of the patch kPatchPrefetch ahead are prefetched (prefetch_runs).
// Bytes as kernels/patchify_gather.py: B*T*K*P*P*3 * (E_in + E_out) (+ 8*B*T*K); the reads are
// whole cache lines, so memory serves somewhat more than the E_in bytes counted (a 54-byte run
// touches one or two 64-byte lines).
at::Tensor patchify_gather_cpu(const at::Tensor& video, const at::Tensor& pos, int64_t P) {
  const auto dims = check_patchify(video, pos, P);  // named copies: the lambdas below capture them
  const int64_t B = dims[0], T = dims[1], H = dims[2], W = dims[3], K = dims[4];
  auto vc = video.contiguous();
  auto pc = pos.contiguous();
  const int64_t F = P * P * 3, NW = W / P, N = (H / P) * NW, run = 3 * P, W3 = W * 3;
  auto out = at::empty({B, T, K, F}, vc.options().dtype(acc_type(vc.scalar_type())));
  const int64_t* ip = pc.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, vc.scalar_type(), "patchify_gather_cpu", [&] {
    using out_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* v = vc.data_ptr<scalar_t>();
    out_t* o = out.data_ptr<out_t>();
    // The first element of patch r (row r of the [B*T*K] patches), whose pos value is nidx.
    auto patch_src = [&](int64_t r, int64_t nidx) {
      return v + (r / K) * H * W3 + (nidx / NW) * P * W3 + (nidx % NW) * run;
    };
    at::parallel_for(0, B * T * K, kRowGrain / 4, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t nidx = ip[r];
        TORCH_CHECK(nidx >= 0 && nidx < N, "patchify_gather: pos value ", nidx, " out of range [0, ", N, ")");
        if constexpr (std::is_same_v<scalar_t, uint8_t>) {
          const int64_t ahead = r + kPatchPrefetch;
          if (ahead < end && ip[ahead] >= 0 && ip[ahead] < N) {  // a bad value is refused at its own row
            prefetch_runs(reinterpret_cast<const char*>(patch_src(ahead, ip[ahead])), run, W3, P);
          }
        }
        const scalar_t* src = patch_src(r, nidx);
        out_t* dst = o + r * F;
        for (int64_t p = 0; p < P; ++p, src += W3, dst += run) patch_row(dst, src, run);
      }
    });
  });
  return out;
}

int64_t intra_op_threads() {
  // One single-element task per thread: each that runs one marks its slot (distinct slots, no race).
  const int64_t n = at::get_num_threads();
  std::vector<char> ran(n, 0);
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) { ran[at::get_thread_num()] = 1; });
  return std::count(ran.begin(), ran.end(), 1);
}

TORCH_LIBRARY_IMPL(videoprism, CPU, m) {
  m.impl("gather_tokens_native", &gather_tokens_cpu);
  m.impl("scatter_tokens_native", &scatter_tokens_cpu);
  m.impl("shuffle_tokens_fwd_native", &shuffle_tokens_fwd_cpu);
  m.impl("shuffle_tokens_bwd_native", &shuffle_tokens_bwd_cpu);
  m.impl("patchify_gather_native", &patchify_gather_cpu);
}

}  // namespace videoprism
