// Header-only CPU reference of the lightning indexer (Eigen) and of routing selection.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cstdint>
#include <functional>
#include <type_traits>

#include "clsa/cpu/paged.hpp"
#include "clsa/numeric.hpp"

namespace clsa {
namespace cpu {

using RowMajorMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MatrixMap = Eigen::Map<RowMajorMatrix>;
using ConstMatrixMap = Eigen::Map<const RowMajorMatrix>;

/// ReLU that keeps NaN (a NaN dot product must stay a NaN score, ranked last).
inline float relu_keep_nan(float x) {
  return x < 0.0f ? 0.0f : x;
}

/// Floats of scratch that index_scores needs for `count` tokens, `rows` query rows of `heads` heads.
inline std::size_t index_scores_scratch(int count, int dim, int rows, int heads) {
  return static_cast<std::size_t>(count) * static_cast<std::size_t>(dim + rows * heads);
}

/// Indexer scores of positions [begin, begin+count) of one sequence for `rows` query rows:
///   scores[r*score_stride + j] = scale * sum_h w[r*heads+h] * ReLU(q[(r*heads+h)*dim ...] . key(begin+j))
/// q is f32 [rows*heads, dim], w f32 [rows*heads]. e4m3 keys (Elem = float8_e4m3) are their
/// values times their per-token scale s: the dot product is taken with the values, exact in f32,
/// and multiplied by s (DeepGEMM's fp8_paged_mqa_logits applies s after the ReLU and the head
/// weights, the same for s > 0 up to f32 rounding), then ReLU and head weights as for any key.
template <class Elem>
void index_scores(const PagedSequence<Elem>& sequence, std::int64_t begin, int count, int dim, const float* q,
                  const float* w, int rows, int heads, float scale, float* scores, std::int64_t score_stride,
                  float* scratch) {
  float* keys = scratch;
  for (int j = 0; j < count; ++j)
    widen(sequence.index_key(begin + j), dim, keys + static_cast<std::ptrdiff_t>(j) * dim);
  ConstMatrixMap key_matrix(keys, count, dim);
  ConstMatrixMap query_matrix(q, static_cast<Eigen::Index>(rows) * heads, dim);
  MatrixMap dots(keys + static_cast<std::ptrdiff_t>(count) * dim, count, static_cast<Eigen::Index>(rows) * heads);
  dots.noalias() = key_matrix * query_matrix.transpose();
  if constexpr (std::is_same<Elem, float8_e4m3>::value) {
    for (int j = 0; j < count; ++j) dots.row(j) *= sequence.index_scale(begin + j);
  }
  for (int r = 0; r < rows; ++r) {
    const float* weights = w + static_cast<std::ptrdiff_t>(r) * heads;
    float* out = scores + r * score_stride;
    for (int j = 0; j < count; ++j) {
      const float* dot_row = dots.data() + static_cast<std::ptrdiff_t>(j) * rows * heads + r * heads;
      float sum = 0.0f;
      for (int h = 0; h < heads; ++h) sum += weights[h] * relu_keep_nan(dot_row[h]);
      out[j] = scale * sum;
    }
  }
}

/// Routing of one query token that sees positions [0, visible): the first min(sinks, visible)
/// and last `window` positions always, then the best routing_key()s, top_k in all (or every
/// visible position when top_k >= visible). Requires sinks + window <= top_k. Writes the
/// positions in ascending order to `out` and returns their count. `keys` holds >= visible entries.
inline int select_row(const float* scores, int visible, int top_k, int sinks, int window, std::int32_t* out,
                      std::uint64_t* keys) {
  const int count = std::min(top_k, visible);
  if (count == visible) {
    for (int p = 0; p < visible; ++p) out[p] = p;
    return count;
  }
  const int sink_end = std::min(sinks, visible);
  const int window_begin = std::max(sink_end, visible - window);
  const int candidates = window_begin - sink_end;
  const int needed = count - sink_end - (visible - window_begin);
  int written = 0;
  for (int p = 0; p < sink_end; ++p) out[written++] = p;
  if (needed > 0) {
    for (int i = 0; i < candidates; ++i) keys[i] = routing_key(scores[sink_end + i], sink_end + i);
    if (needed < candidates) std::nth_element(keys, keys + needed - 1, keys + candidates, std::greater<>());
    std::int32_t* middle = out + written;
    for (int i = 0; i < needed; ++i) middle[i] = routing_key_position(keys[i]);
    std::sort(middle, middle + needed);
    written += needed;
  }
  for (int p = window_begin; p < visible; ++p) out[written++] = p;
  return written;
}

}  // namespace cpu
}  // namespace clsa
