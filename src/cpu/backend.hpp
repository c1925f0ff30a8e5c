// The CPU backend: Eigen reference kernels (include/clsa/cpu/) threaded over work items.
#pragma once

#include "backend/backend.hpp"

namespace clsa {
namespace detail {

const ComputeBackend& cpu_backend();

/// The CPU drivers of the indexer and attention (src/cpu/indexer.cpp, src/cpu/attention.cpp).
std::unique_ptr<Plan> plan_indexer_cpu(const IndexerConfig& config, const Bounds& bounds);
void select_cpu(const IndexerConfig& config, const SelectCall& call, const Plan& plan, void* scratch);
std::unique_ptr<Plan> plan_attention_cpu(const AttentionConfig& config, const Bounds& bounds);
void attend_cpu(const AttentionConfig& config, const AttendCall& call, const Plan& plan, void* scratch);

}  // namespace detail
}  // namespace clsa
