// libclsa: Cross-Layer Sparse Attention for YOCO-style cross-decoders.
//
// One SharedKVCache holds K, V and indexer keys for every cross-decoder layer; one
// CrossLayerIndexer::select per decoding step routes each query token to its top-k cached
// tokens; every layer's SparseCrossAttention::forward reuses that RoutingIndex.
#pragma once

#include "clsa/attention.hpp"
#include "clsa/cache.hpp"
#include "clsa/indexer.hpp"
#include "clsa/numeric.hpp"
#include "clsa/tensor.hpp"
#include "clsa/types.hpp"
#include "clsa/version.hpp"
