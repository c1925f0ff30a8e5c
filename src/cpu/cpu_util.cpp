#include "cpu/cpu_util.hpp"

#include "clsa/cpu/paged.hpp"

namespace clsa {
namespace detail {

void widen_to_f32(const TensorView& tensor, float* out) {
  const int rank = tensor.rank();
  if (rank == 0 || tensor.numel() == 0) return;
  const std::int64_t inner = tensor.size(rank - 1);
  const std::int64_t rows = tensor.numel() / inner;
  dispatch_activation(tensor.dtype(), [&](auto tag) {
    using Elem = typename decltype(tag)::type;
    const Elem* base = tensor.data_as<const Elem>();
    for (std::int64_t row = 0; row < rows; ++row) {
      // Offset of this row from its multi-index over the outer dimensions.
      std::int64_t remainder = row;
      std::int64_t offset = 0;
      for (int d = rank - 2; d >= 0; --d) {
        offset += (remainder % tensor.size(d)) * tensor.stride(d);
        remainder /= tensor.size(d);
      }
      cpu::widen(base + offset, static_cast<int>(inner), out + row * inner);
    }
  });
}

}  // namespace detail
}  // namespace clsa
