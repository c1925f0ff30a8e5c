// What every component (the indexer, both attentions) is below its public class: its backend and
// device, its plan on a workspace, the kernels' after-the-fact status, and the one plan lifecycle
// (workspace_bytes, reserve, set_workspace, the automatic plan of a call, the batch checks every
// call makes). A component says only how a plan for given bounds is made (make_plan).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "backend/backend.hpp"
#include "backend/memory.hpp"
#include "backend/planned_workspace.hpp"
#include "common/check.hpp"
#include "common/plan.hpp"

namespace clsa {
namespace detail {

class ComponentCore {
 public:
  Backend backend = Backend::cpu;
  Device device{};
  const ComputeBackend* ops = nullptr;
  PlannedWorkspace planned;
  std::unique_ptr<StatusReport> status;  // what kernels report after the fact (CUDA); null elsewhere

  /// `span_name` names the bounds' span in messages ("max_length", "top_k").
  ComponentCore(Backend requested, const char* span_name) : span_name_(span_name) {
    backend = resolve_backend(requested);
    device = backend_device(backend);
    ops = &compute_backend(backend);
    planned.workspace.set_device(device);
    const DeviceGuard guard(device);
    status = ops->make_status_report();
  }
  virtual ~ComponentCore() = default;
  ComponentCore(const ComponentCore&) = delete;
  ComponentCore& operator=(const ComponentCore&) = delete;

  /// The backend's plan for `bounds` and the workspace bytes the component needs with it
  /// (nothing adopted).
  virtual std::unique_ptr<Plan> make_plan(const Bounds& bounds, std::size_t* bytes) const = 0;

  /// Bytes a plan for these bounds needs, made on the side (this component's plan stays).
  std::size_t bytes(const char* fn, const Bounds& bounds) const {
    check_bounds(fn, bounds, span_name_);
    const DeviceGuard guard(device);
    std::size_t needed = 0;
    make_plan(bounds, &needed);
    return needed;
  }

  /// All or nothing: a refused plan (bounds, caller memory) leaves the current one in place.
  void adopt(const char* fn, const Bounds& bounds, bool fixed, Stream stream, bool on_stream,
             const Workspace::External* external = nullptr) {
    std::size_t needed = 0;
    std::unique_ptr<Plan> next = make_plan(bounds, &needed);
    planned.adopt(fn, std::move(next), needed, bounds, fixed, stream, on_stream, external);
  }

  /// Re-plans the current bounds (a change of what the plan carves); nothing when unplanned.
  void replan(const char* fn) {
    if (planned.plan == nullptr) return;
    const DeviceGuard guard(device);
    adopt(fn, planned.book.bounds(), planned.book.fixed(), {}, false);
  }

  void reserve(const char* fn, const Bounds& bounds) {
    check_bounds(fn, bounds, span_name_);
    const DeviceGuard guard(device);
    adopt(fn, bounds, true, {}, false);
  }

  void set_workspace(const char* fn, void* data, std::size_t size, const Bounds& bounds) {
    check_bounds(fn, bounds, span_name_);
    const DeviceGuard guard(device);
    const Workspace::External external{data, size};
    adopt(fn, bounds, true, {}, false, &external);
  }

  /// Plans (or holds against the plan) a call of these bounds: an unplanned or outgrown automatic
  /// plan grows (the span rounded up to a power of two when `round_span`), on the call's stream.
  void prepare(const char* fn, const Bounds& call, bool round_span, Stream stream) {
    if (planned.book.needs_plan(fn, call, span_name_))
      adopt(fn, planned.book.grown(call, round_span), false, stream, true);
  }

  /// Marks `batch` as captured (CacheBatch::captured) when `stream` is capturing a CUDA graph:
  /// the call about to be enqueued reads the batch's tables, so they must not move from now on.
  /// One capture-status query per call.
  void note_capture(const CacheBatch& batch, Stream stream) const {
    if (ops->capturing(stream)) mark_captured(batch);
  }

  /// Raises what kernels reported since the last check; `consequence` says what they did instead.
  void check_status(const char* fn, const char* consequence) {
    if (status) status->check(fn, consequence);
  }

  /// What every call checks of its batch first: not empty, on this component's device (`what`
  /// names the component in the message: "indexer", "attention").
  void check_batch(const char* fn, const CacheBatch& batch, const char* what) const {
    if (batch.num_sequences() <= 0) fail(ErrorCode::invalid_argument, concat(fn, ": batch is empty (no sequences)"));
    if (batch.device() != device) {
      fail(ErrorCode::device_mismatch, concat(fn, ": batch lives on ", device_name(batch.device()), " but this ", what,
                                              " computes on ", device_name(device)));
    }
  }

  /// And once T is known: no sequence shorter than T (an empty slot holds 0); `hint` ends the message.
  static void check_lengths(const char* fn, const CacheBatch& batch, std::int64_t tokens, const char* hint) {
    for (int b = 0; b < batch.num_sequences(); ++b) {
      if (batch.length(b) > 0 && batch.length(b) < tokens) {
        fail(ErrorCode::invalid_argument, concat(fn, ": batch sequence ", b, " holds ", batch.length(b),
                                                 " tokens, fewer than the T = ", tokens, " query tokens (", hint, ")"));
      }
    }
  }

 private:
  const char* span_name_;
};

}  // namespace detail
}  // namespace clsa
