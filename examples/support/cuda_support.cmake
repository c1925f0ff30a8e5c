# clsa_cuda_support: examples/support/cuda_support.hpp (streams, graphs, timing) and
# engine_support.hpp (an engine's pool layout) for the examples and the tests. Where the library
# is built with CUDA it links the CUDA runtime and defines CLSA_WITH_CUDA_RUNTIME=1; elsewhere the
# types of cuda_support.hpp serve the CPU backend alone.
include_guard(GLOBAL)
add_library(clsa_cuda_support INTERFACE)
target_include_directories(clsa_cuda_support INTERFACE ${CMAKE_CURRENT_LIST_DIR})
target_link_libraries(clsa_cuda_support INTERFACE clsa::clsa)
if(CLSA_WITH_CUDA)
  target_link_libraries(clsa_cuda_support INTERFACE CUDA::cudart_static)
  target_compile_definitions(clsa_cuda_support INTERFACE CLSA_WITH_CUDA_RUNTIME=1)
endif()
