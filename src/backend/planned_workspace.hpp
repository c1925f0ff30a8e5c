// A component's plan and the workspace carved for it (the indexer's and the attention's alike).
#pragma once

#include <cstddef>
#include <memory>
#include <utility>

#include "backend/backend.hpp"
#include "backend/memory.hpp"
#include "common/plan.hpp"

namespace clsa {
namespace detail {

struct PlannedWorkspace {
  Workspace workspace;
  PlanBook book;               // the bounds planned for
  std::unique_ptr<Plan> plan;  // the backend's plan
  void* base = nullptr;        // the workspace the plan carved

  /// Takes over `next` (needing `bytes` of workspace) for `bounds`, all or nothing: a plan refused
  /// before the memory changed (bounds, caller memory) leaves the current one in place; one that
  /// failed after (a CUDA error zeroing new memory) leaves none, so nothing keeps pointing at the
  /// old memory and the next call plans afresh.
  void adopt(const char* fn, std::unique_ptr<Plan> next, std::size_t bytes, const Bounds& bounds, bool fixed,
             Stream stream, bool on_stream, const Workspace::External* external) {
    try {
      base = workspace.adopt(fn, bytes, stream, on_stream, external);
    } catch (...) {
      if (workspace.data() != base) {
        base = nullptr;
        plan.reset();
        book = PlanBook{};
      }
      throw;
    }
    plan = std::move(next);
    book.set(bounds, fixed);
  }
};

}  // namespace detail
}  // namespace clsa
