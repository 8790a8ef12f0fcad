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
#include <optional>
#include <vector>

#include "fusedloss/buffers.h"

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

// A tile row's stride: columns rounded up to 16 elements (64 bytes in fp32).
// A GEMM writing rows of an odd width (V = 50257) runs ≈ 1.45× slower on the
// CPU (MKL, measured) than into rows padded to this stride.
inline int64_t aligned_columns(int64_t columns) { return (columns + 15) / 16 * 16; }

// The front [rows, columns] of a flat workspace, rows aligned_columns() apart.
inline at::Tensor aligned_tile_view(const at::Tensor& workspace, int64_t rows, int64_t columns) {
  const int64_t stride = aligned_columns(columns);
  return workspace.narrow(0, 0, rows * stride).view({rows, stride}).narrow(1, 0, columns);
}

template <typename Family>
void forward_chunks(Family& family) {
  const int64_t rows = family.rows();
  if (rows == 0) return;
  const at::Tensor workspace = empty_buffer({rows * widest(family.chunks())}, family.options().dtype(family.acc_dtype));
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
  const at::Tensor workspace = empty_buffer({elems}, family.options().dtype(family.acc_dtype));
  const at::Tensor dlogits_workspace = family.operand_dtype == family.acc_dtype
                                           ? workspace
                                           : empty_buffer({elems}, family.options().dtype(family.operand_dtype));
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

// ---------------------------------------------------------------------------
// Single pass over row blocks, for a loss whose whole row of columns fits a
// tile: per block of R rows the family forms the [R, columns] logits tile,
// folds and finalizes its rows, writes their dlogits in place and runs its
// gradient GEMMs: no logits are recomputed (6·N·D·V FLOPs for a linear CE
// instead of the recompute pair's 8). The backward then only scales.

// Rows [start, start + count) of the single pass.
struct RowBlock {
  int64_t start;
  int64_t count;
};

inline std::vector<RowBlock> row_blocks(int64_t rows, int64_t block) {
  std::vector<RowBlock> blocks;
  for (int64_t start = 0; start < rows; start += block) blocks.push_back({start, std::min(block, rows - start)});
  return blocks;
}

// Rows per block of a single pass over `columns` columns within `budget_bytes`
// (tile 4·R·columns bytes, plus `per_pass_bytes` when there is more than one
// block: a half-precision weight's fp32 dW accumulator), or 0 when R would be
// below `min_rows`: each extra block re-reads and re-writes the weight
// gradient, so below that the recompute pair is cheaper.
inline int64_t single_pass_block_rows(int64_t rows, int64_t columns, int64_t budget_bytes, int64_t per_pass_bytes,
                                int64_t min_rows) {
  const int64_t row_bytes = 4 * std::max<int64_t>(aligned_columns(columns), 1);
  if (rows * row_bytes <= budget_bytes) return std::max<int64_t>(rows, 1);
  const int64_t block = (budget_bytes - per_pass_bytes) / row_bytes;
  return block >= min_rows ? block : 0;
}

// Budget of the single pass's tile (plus a half-precision weight's fp32 gradient
// accumulator when the rows take more than one block) when the caller gives
// none: the whole tile of the benchmark shapes fits on CUDA, and on the
// CPU blocks of >= 512 rows at V = 128k.
inline int64_t default_memory_budget(bool cuda) { return cuda ? (int64_t(4) << 30) : (int64_t(256) << 20); }

// Below this many rows per block, re-reading and re-writing the V x D weight
// gradient once per block costs more than the logits GEMM the single pass
// saves (2·R·V·D FLOPs against 8·V·D bytes: worth it when R > 4 · FLOP/s per
// byte/s of memory traffic, ≈ 40 for a 2-core CPU in fp32, ≈ 900 for an
// H100/H200 in bf16), and the recompute pair is used instead.
inline int64_t min_block_rows(bool cuda) { return cuda ? 1024 : 64; }

// Rows per block of a single pass: `row_block` when the caller forces one,
// else the most that fit `memory_budget` (0: the default), or 0 for the
// recompute pair (see single_pass_block_rows).
inline int64_t choose_block_rows(int64_t rows, int64_t columns, int64_t row_block, int64_t memory_budget,
                                 int64_t per_pass_bytes, bool cuda) {
  if (row_block > 0) return std::min(row_block, std::max<int64_t>(rows, 1));
  const int64_t budget = memory_budget > 0 ? memory_budget : default_memory_budget(cuda);
  return single_pass_block_rows(rows, columns, budget, per_pass_bytes, min_block_rows(cuda));
}

// The upstream gradient of every row of a single pass, 1 / normalizer (none:
// 1), formed on the device without a host sync.
inline at::Tensor normalized_row_grads(const std::optional<at::Tensor>& normalizer, int64_t rows,
                                       const at::TensorOptions& acc_options) {
  if (!normalizer.has_value()) return at::ones({rows}, acc_options);
  return normalizer->to(acc_options.dtype()).reciprocal().reshape({1}).expand({rows}).contiguous();
}

// The dlogits of a tile written over its own fp32 storage: the tile itself, or
// a half-precision view with row r inside row r's fp32 bytes (row stride
// doubled), so rows processed in parallel never overlap; within a row the row
// kernel reads each element before the bytes it lands on are written.
inline at::Tensor dlogits_over(const at::Tensor& tile, at::ScalarType dtype) {
  if (tile.scalar_type() == dtype) return tile;
  return tile.view(dtype).narrow(1, 0, tile.size(1));
}

// A Family for single_pass provides, besides rows() / acc_dtype / options():
//   int64_t columns() const;  std::vector<RowBlock> blocks() const;
//   at::ScalarType dlogits_dtype() const;  // written over the tile (dlogits_over)
//   template <acc_t> void fold_rows(const RowBlock&, Tensor& tile);        // logits, row state, finalize
//   template <acc_t> void rows_dlogits(const RowBlock&, Tensor& tile, Tensor& dlogits);
//   void rows_gradients(const RowBlock&, const Tensor& dlogits);
template <typename Family>
void single_pass(Family& family) {
  const std::vector<RowBlock> blocks = family.blocks();
  if (blocks.empty()) return;
  const int64_t columns = family.columns();
  // On the CPU the tile's mapping comes back from the pool (buffers.h) call after call.
  const at::Tensor workspace =
      empty_buffer({blocks.front().count * aligned_columns(columns)}, family.options().dtype(family.acc_dtype));
  AT_DISPATCH_FLOATING_TYPES(family.acc_dtype, "fusedloss_single_pass", [&] {
    for (const RowBlock& rows : blocks) {
      at::Tensor tile = aligned_tile_view(workspace, rows.count, columns);
      family.template fold_rows<scalar_t>(rows, tile);
      at::Tensor dlogits = dlogits_over(tile, family.dlogits_dtype());
      family.template rows_dlogits<scalar_t>(rows, tile, dlogits);
      family.rows_gradients(rows, dlogits);
    }
  });
}

}  // namespace fusedloss
