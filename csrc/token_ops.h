// Shape and dtype checks shared by the CPU and CUDA kernels of the token ops, and the
// accumulation type of the reductions. Index *values* are checked inside the kernels:
// exceptions in the CPU loops, device asserts in the CUDA kernels (no host sync).
#pragma once
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <array>
#include <string>

namespace videoprism {

// The type the token ops sum in, fp32 (for half types and fp32; uint8 too) or fp64 for fp64: also the type of
// the shuffle's embedding grads and of patchify_gather's output (float32 for uint8/half/fp32 video, float64 for
// float64). The Python twin is kernels/token_ops_ref.py acc_dtype.
inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_index(const char* op, const char* name, const at::Tensor& idx, const at::Tensor& x, int64_t cols) {
  TORCH_CHECK(idx.dim() == 2 && idx.size(0) == x.size(0) && (cols < 0 || idx.size(1) == cols), op, ": ", name,
              " must be [B, ", cols < 0 ? "M" : std::to_string(cols), "] with B = ", x.size(0), ", got ", idx.sizes());
  TORCH_CHECK(idx.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", idx.scalar_type());
  TORCH_CHECK(idx.device() == x.device(), op, ": ", name, " is on ", idx.device(), " but the data on ", x.device());
}

inline void check_tokens(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 3, op, ": ", name, " must be [B, L, D], got ", x.sizes());
}

inline void check_float(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": ", name, " must be a float tensor, got ",
              x.scalar_type());
}

// Checks of shuffle_tokens_fwd_native; returns {B, m, n, D}.
inline std::array<int64_t, 4> check_shuffle_fwd(const at::Tensor& visible, const at::Tensor& perm,
                                                 const at::Tensor& mask_emb, const at::Tensor& pos_emb) {
  const char* op = "shuffle_with_mask_tokens";
  check_tokens(op, "visible", visible);
  check_float(op, "visible", visible);
  check_index(op, "perm", perm, visible, -1);
  const int64_t B = visible.size(0), m = visible.size(1), D = visible.size(2), n = perm.size(1);
  TORCH_CHECK(n >= m, op, ": perm has n = ", n, " slots but visible has m = ", m, " tokens; need n >= m");
  TORCH_CHECK(mask_emb.dim() == 1 && mask_emb.size(0) == D, op, ": mask_emb must be [D = ", D, "], got ",
              mask_emb.sizes());
  TORCH_CHECK(pos_emb.dim() == 2 && pos_emb.size(0) == n && pos_emb.size(1) == D, op, ": pos_emb must be [n = ", n,
              ", D = ", D, "], got ", pos_emb.sizes());
  check_float(op, "mask_emb", mask_emb);
  check_float(op, "pos_emb", pos_emb);
  TORCH_CHECK(mask_emb.device() == visible.device() && pos_emb.device() == visible.device(), op,
              ": mask_emb and pos_emb must be on the device of visible (", visible.device(), ")");
  return {B, m, n, D};
}

inline void check_shuffle_bwd(const at::Tensor& grad, const at::Tensor& perm, int64_t m) {
  const char* op = "shuffle_with_mask_tokens backward";
  check_tokens(op, "grad", grad);
  check_float(op, "grad", grad);
  check_index(op, "perm", perm, grad, grad.size(1));
  TORCH_CHECK(m >= 0 && m <= grad.size(1), op, ": m must be in [0, n = ", grad.size(1), "], got ", m);
}

// Checks of patchify_gather_native; returns {B, T, H, W, K}.
inline std::array<int64_t, 5> check_patchify(const at::Tensor& video, const at::Tensor& pos, int64_t P) {
  const char* op = "patchify_gather";
  TORCH_CHECK(video.dim() == 5 && video.size(4) == 3, op, ": video must be [B, T, H, W, 3] (channels last), got ",
              video.sizes());
  TORCH_CHECK(video.scalar_type() == at::kByte || at::isFloatingType(video.scalar_type()), op,
              ": video must be uint8 or float, got ", video.scalar_type());
  TORCH_CHECK(P >= 1, op, ": patch_size must be >= 1, got ", P);
  TORCH_CHECK(video.size(2) % P == 0 && video.size(3) % P == 0, op, ": H x W = ", video.size(2), " x ",
              video.size(3), " must be multiples of patch_size ", P, "; resize or crop the video");
  TORCH_CHECK(pos.dim() == 3 && pos.size(0) == video.size(0) && pos.size(1) == video.size(1), op,
              ": pos must be [B, T, K] with B, T = ", video.size(0), ", ", video.size(1), ", got ", pos.sizes());
  TORCH_CHECK(pos.scalar_type() == at::kLong, op, ": pos must be int64, got ", pos.scalar_type());
  TORCH_CHECK(pos.device() == video.device(), op, ": pos is on ", pos.device(), " but video on ", video.device());
  return {video.size(0), video.size(1), video.size(2), video.size(3), pos.size(2)};
}

// The number of threads at::parallel_for spreads the CPU kernels' rows over (token_ops_cpu.cpp, built with
// their flags): torch's intra-op thread count, or 1 in a build without OpenMP (setup.py says why).
int64_t intra_op_threads();

}  // namespace videoprism
