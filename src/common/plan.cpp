#include "common/plan.hpp"

#include <algorithm>

#include "common/check.hpp"

namespace clsa {
namespace detail {

bool PlanBook::needs_plan(const char* function, const Bounds& call, const char* span_name) const {
  if (planned_ && bounds_.covers(call)) return false;
  if (fixed_) {
    fail(ErrorCode::capacity_exceeded,
         concat(function, ": this call has ", call.sequences, " sequences, ", call.tokens, " query tokens and ",
                span_name, " ", call.span, "; the component is planned for at most ", bounds_.sequences, ", ",
                bounds_.tokens, " and ", bounds_.span, " (reserve() or set_workspace() with larger bounds)"));
  }
  return true;
}

Bounds PlanBook::grown(const Bounds& call, bool round_span) const {
  Bounds next = planned_ ? bounds_ : Bounds{};
  next.sequences = std::max(next.sequences, call.sequences);
  next.tokens = std::max(next.tokens, call.tokens);
  std::int64_t span = call.span;
  if (round_span) {
    std::int64_t rounded = 256;
    while (rounded < span) rounded *= 2;
    span = rounded;
  }
  next.span = std::max(next.span, span);
  return next;
}

void check_bounds(const char* function, const Bounds& bounds, const char* span_name) {
  check_positive(function, "max_sequences", bounds.sequences);
  check_positive(function, "max_tokens", bounds.tokens);
  check_positive(function, span_name, bounds.span);
}

}  // namespace detail
}  // namespace clsa
