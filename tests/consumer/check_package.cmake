# Run by CTest: install the clsa build into a fresh prefix, build the consumer project against
# it with find_package(clsa CONFIG REQUIRED), run the consumer.
foreach(var CLSA_BUILD_DIR CLSA_CONSUMER_DIR CLSA_WORK_DIR CLSA_GENERATOR)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "${var} is not set")
  endif()
endforeach()
file(REMOVE_RECURSE "${CLSA_WORK_DIR}")
set(prefix "${CLSA_WORK_DIR}/prefix")
set(config_args)
if(CLSA_CONFIG)
  set(config_args --config "${CLSA_CONFIG}")
endif()

function(run_step)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE result)
  if(NOT result EQUAL 0)
    message(FATAL_ERROR "failed (${result}): ${ARGN}")
  endif()
endfunction()

run_step(${CMAKE_COMMAND} --install "${CLSA_BUILD_DIR}" --prefix "${prefix}" ${config_args})
run_step(${CMAKE_COMMAND} -S "${CLSA_CONSUMER_DIR}" -B "${CLSA_WORK_DIR}/build" -G "${CLSA_GENERATOR}"
         "-DCMAKE_PREFIX_PATH=${prefix};${CMAKE_PREFIX_PATH}" -DCMAKE_BUILD_TYPE=Release)
run_step(${CMAKE_COMMAND} --build "${CLSA_WORK_DIR}/build" ${config_args})
find_program(consumer consumer PATHS "${CLSA_WORK_DIR}/build" "${CLSA_WORK_DIR}/build/${CLSA_CONFIG}" NO_DEFAULT_PATH)
run_step("${consumer}")
