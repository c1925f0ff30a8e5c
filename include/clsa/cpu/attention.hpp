// Header-only CPU reference of cross-attention over a paged cache (Eigen), for one GQA group of
// one query token: the group's query heads share every gathered K/V row.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "clsa/cpu/indexer.hpp"
#include "clsa/cpu/paged.hpp"

namespace clsa {
namespace cpu {

/// Cache rows gathered and processed at once.
constexpr int kAttentionChunk = 64;

/// Floats of scratch that attend() needs.
inline std::size_t attention_scratch(int dim, int group) {
  return static_cast<std::size_t>(kAttentionChunk) * (2 * dim + group) + static_cast<std::size_t>(group) * (dim + 2);
}

/// Softmax attention of `group` query heads (q: f32 [group, dim]) over `count` cache rows of kv
/// head `kv_head`, row i at position position_of(i). Writes out f32 [group, dim] and, when lse is
/// not null, lse[g] = log sum_i exp(scale * q_g . k_i). Online softmax over chunks of rows. With
/// count 0, out is 0 and lse -inf.
template <class Elem, class PositionOf>
void attend(const PagedSequence<Elem>& sequence, int kv_head, int dim, int count, PositionOf position_of,
            const float* q, int group, float scale, float* out, float* lse, float* scratch) {
  constexpr int chunk = kAttentionChunk;
  float* keys = scratch;
  float* values = keys + chunk * dim;
  float* logits = values + chunk * dim;
  float* running_max = logits + chunk * group;
  float* running_sum = running_max + group;
  float* accumulator = running_sum + group;
  MatrixMap acc(accumulator, group, dim);
  acc.setZero();
  std::fill(running_max, running_max + group, -std::numeric_limits<float>::infinity());
  std::fill(running_sum, running_sum + group, 0.0f);
  ConstMatrixMap query(q, group, dim);

  for (int start = 0; start < count; start += chunk) {
    const int rows = std::min(chunk, count - start);
    for (int j = 0; j < rows; ++j) {
      const std::int64_t position = position_of(start + j);
      widen(sequence.key(position, kv_head), dim, keys + j * dim);
      widen(sequence.value(position, kv_head), dim, values + j * dim);
    }
    ConstMatrixMap key_rows(keys, rows, dim);
    ConstMatrixMap value_rows(values, rows, dim);
    MatrixMap probabilities(logits, group, rows);
    probabilities.noalias() = query * key_rows.transpose();
    for (int g = 0; g < group; ++g) {
      auto row = probabilities.row(g);
      row *= scale;
      const float new_max = std::max(running_max[g], row.maxCoeff());
      // All -inf so far: subtract nothing (exp(-inf) is 0 already) instead of -inf - -inf = NaN.
      const float shift = new_max == -std::numeric_limits<float>::infinity() ? 0.0f : new_max;
      const float correction = std::exp(running_max[g] - shift);
      row = (row.array() - shift).exp().matrix();
      running_sum[g] = running_sum[g] * correction + row.sum();
      acc.row(g) *= correction;
      running_max[g] = new_max;
    }
    acc.noalias() += probabilities * value_rows;
  }
  for (int g = 0; g < group; ++g) {
    // No rows (an empty batch slot): out = 0, lse = -inf.
    const float inverse = running_sum[g] > 0.0f ? 1.0f / running_sum[g] : 0.0f;
    for (int d = 0; d < dim; ++d) out[g * dim + d] = acc(g, d) * inverse;
    if (lse != nullptr) lse[g] = running_max[g] + std::log(running_sum[g]);
  }
}

}  // namespace cpu
}  // namespace clsa
