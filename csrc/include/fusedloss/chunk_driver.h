// The chunk loops every family shares. A family's logits are [rows, columns]
// (vocabulary, candidates or keys as columns) and never exist whole: the
// driver walks them in column chunks through one fp32 [rows, chunk] workspace.
//
// Forward, per chunk: the family forms the chunk's raw logits (a GEMM or a
// gathered dot) and folds them into its per-row state; then it finalizes.
// Backward, per chunk: the logits are recomputed, turned into dlogits (in the
// GEMM operand dtype; in place over the workspace when that is the
// accumulation dtype), and fed to the family's gradient GEMMs / scatters.
//
// A Family provides:
//   int64_t rows() const;  const std::vector<Chunk>& chunks() const;
//   at::ScalarType acc_dtype, operand_dtype;  at::TensorOptions options() const;
//   template <acc_t> void chunk_logits(const Chunk&, Tensor& logits);
//   template <acc_t> void fold(const Chunk&, Tensor& logits);             // forward
//   template <acc_t> void finalize();                                     // forward
//   template <acc_t> Tensor chunk_dlogits(const Chunk&, Tensor& logits, Tensor& dlogits_workspace);
//   void chunk_gradients(const Chunk&, const Tensor& dlogits);           // backward
// chunk_dlogits returns the tensor that holds the dlogits: normally the
// workspace view it was given, or the logits themselves for row-wise chunks
// that stay in the accumulation dtype.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace fusedloss {

// A block of columns [start, start + columns); `kind` is the family's own tag
// (sampled losses: true columns, shared or per-row candidates).
struct Chunk {
  int64_t start;
  int64_t columns;
  int kind = 0;
};

// Chunks of at most `chunk_size` columns covering [0, columns).
inline std::vector<Chunk> column_chunks(int64_t columns, int64_t chunk_size, int kind = 0) {
  std::vector<Chunk> chunks;
  for (int64_t start = 0; start < columns; start += chunk_size) {
    chunks.push_back({start, std::min(chunk_size, columns - start), kind});
  }
  return chunks;
}

inline int64_t widest(const std::vector<Chunk>& chunks) {
  int64_t widest = 0;
  for (const Chunk& c : chunks) widest = std::max(widest, c.columns);
  return widest;
}

// The front [rows, columns] of a flat workspace.
inline at::Tensor tile_view(const at::Tensor& workspace, int64_t rows, int64_t columns) {
  return workspace.narrow(0, 0, rows * columns).view({rows, columns});
}

template <typename Family>
void forward_chunks(Family& family) {
  const int64_t rows = family.rows();
  if (rows == 0) return;
  const at::Tensor workspace = at::empty({rows * widest(family.chunks())}, family.options().dtype(family.acc_dtype));
  AT_DISPATCH_FLOATING_TYPES(family.acc_dtype, "fusedloss_forward_chunks", [&] {
    for (const Chunk& c : family.chunks()) {
      at::Tensor logits = tile_view(workspace, rows, c.columns);
      family.template chunk_logits<scalar_t>(c, logits);
      family.template fold<scalar_t>(c, logits);
    }
    family.template finalize<scalar_t>();
  });
}

template <typename Family>
void backward_chunks(Family& family) {
  const int64_t rows = family.rows();
  if (rows == 0) return;
  const int64_t elems = rows * widest(family.chunks());
  const at::Tensor workspace = at::empty({elems}, family.options().dtype(family.acc_dtype));
  const at::Tensor dlogits_workspace = family.operand_dtype == family.acc_dtype
                                           ? workspace
                                           : at::empty({elems}, family.options().dtype(family.operand_dtype));
  AT_DISPATCH_FLOATING_TYPES(family.acc_dtype, "fusedloss_backward_chunks", [&] {
    for (const Chunk& c : family.chunks()) {
      at::Tensor logits = tile_view(workspace, rows, c.columns);
      at::Tensor dlogits_view = tile_view(dlogits_workspace, rows, c.columns);
      family.template chunk_logits<scalar_t>(c, logits);
      const at::Tensor dlogits = family.template chunk_dlogits<scalar_t>(c, logits, dlogits_view);
      family.chunk_gradients(c, dlogits);
    }
  });
}

}  // namespace fusedloss
