// Uses the CPU reference headers (clsa::cpu_reference, header-only, Eigen) from a consumer:
// routing selection of one query row and an Eigen product through the reference's aliases.
#include <clsa/cpu/indexer.hpp>
#include <clsa/version.hpp>
#include <cstdint>
#include <cstdio>

int main() {
  // 10 visible positions, top_k 4: sink 0, window 9, and the two best of 1..8 (3 and 6).
  const float scores[10] = {0.0f, 0.1f, 0.2f, 5.0f, 0.3f, 0.4f, 4.0f, 0.5f, 0.6f, 0.7f};
  std::int32_t selected[10] = {};
  std::uint64_t keys[10] = {};
  const int count = clsa::cpu::select_row(scores, 10, 4, 1, 1, selected, keys);
  const bool routed = count == 4 && selected[0] == 0 && selected[1] == 3 && selected[2] == 6 && selected[3] == 9;

  clsa::cpu::RowMajorMatrix a(2, 2);
  a << 1.0f, 2.0f, 3.0f, 4.0f;
  const clsa::cpu::RowMajorMatrix square = a * a;  // [[7, 10], [15, 22]]
  const bool multiplied = square(0, 0) == 7.0f && square(1, 1) == 22.0f;

  std::printf("libclsa %s CPU reference: routed %d (%d %d %d %d), product %s\n", clsa::version(), count, selected[0],
              selected[1], selected[2], selected[3], multiplied ? "ok" : "wrong");
  return routed && multiplied ? 0 : 1;
}
