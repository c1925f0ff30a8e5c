// What a component is planned for, and how each call is held against it.
#pragma once

#include <cstdint>

namespace clsa {
namespace detail {

/// The largest calls a component is planned for: sequences per batch (B), query tokens per
/// sequence (T) and a span: the longest sequence (indexer, dense attention) or top_k (sparse).
struct Bounds {
  int sequences = 0;
  int tokens = 0;
  std::int64_t span = 0;

  bool covers(const Bounds& call) const {
    return call.sequences <= sequences && call.tokens <= tokens && call.span <= span;
  }
};

/// A component's plan state. Unplanned components plan themselves on their first call and plan
/// again (growing) when a call outgrows them; reserve() and set_workspace() fix the bounds, after
/// which a call outside them is an error (a silent re-plan would move the workspace under a
/// captured CUDA graph).
class PlanBook {
 public:
  /// Whether `call` needs a new plan. Throws Error(capacity_exceeded) naming `function` when the
  /// bounds are fixed and `call` exceeds them; `span_name` names the span in the message.
  bool needs_plan(const char* function, const Bounds& call, const char* span_name) const;
  /// Bounds of an automatic plan for `call`: at least the current ones; the span rounded up to a
  /// power of two when `round_span` (contexts grow a token at a time).
  Bounds grown(const Bounds& call, bool round_span) const;
  void set(const Bounds& bounds, bool fixed) {
    bounds_ = bounds;
    planned_ = true;
    fixed_ = fixed;
  }
  const Bounds& bounds() const { return bounds_; }
  bool fixed() const { return fixed_; }

 private:
  Bounds bounds_{};
  bool planned_ = false;
  bool fixed_ = false;
};

/// Checks reserve()/workspace_bytes() bounds (all positive); throws Error naming `function`.
void check_bounds(const char* function, const Bounds& bounds, const char* span_name);

}  // namespace detail
}  // namespace clsa
