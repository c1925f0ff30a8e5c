# Run by CTest (package.find_package): the package works for a separate consumer project.
#   1. install the clsa build into a fresh prefix; only the library, its headers (with the
#      generated clsa/version.hpp) and the package files go there, the programs only with
#      CLSA_INSTALL_PROGRAMS=ON;
#   2. installed, Eigen hidden (CMAKE_DISABLE_FIND_PACKAGE_Eigen3): clsa::clsa alone configures,
#      builds and runs (no Eigen needed), and asking for the component cpu_reference fails;
#   3. installed, with Eigen: clsa::clsa and clsa::cpu_reference (COMPONENTS cpu_reference);
#   4. the build tree's export (clsa_DIR=<build dir>), Eigen hidden, then with the reference.
# Every consumer checks that the library, its header and the package have the same version.
cmake_minimum_required(VERSION 3.24)  # policies of script mode (IN_LIST)
foreach(var CLSA_BUILD_DIR CLSA_CONSUMER_DIR CLSA_WORK_DIR CLSA_GENERATOR CLSA_VERSION)
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

# name: build folder under the work dir; then extra configure arguments. Configures, builds and
# runs the consumer (and reference_consumer where CLSA_CONSUMER_REFERENCE=ON).
function(consumer name)
  set(build "${CLSA_WORK_DIR}/${name}")
  message(STATUS "consumer ${name}: ${ARGN}")
  run_step(${CMAKE_COMMAND} -S "${CLSA_CONSUMER_DIR}" -B "${build}" -G "${CLSA_GENERATOR}"
           -DCMAKE_BUILD_TYPE=Release "-DCLSA_EXPECTED_VERSION=${CLSA_VERSION}" ${ARGN})
  run_step(${CMAKE_COMMAND} --build "${build}" ${config_args})
  set(programs consumer)
  if("-DCLSA_CONSUMER_REFERENCE=ON" IN_LIST ARGN)
    list(APPEND programs reference_consumer)
  endif()
  foreach(program IN LISTS programs)
    find_program(path_${program}_${name} ${program} PATHS "${build}" "${build}/${CLSA_CONFIG}" NO_DEFAULT_PATH
                 NO_CACHE REQUIRED)
    run_step("${path_${program}_${name}}")
  endforeach()
endfunction()

set(no_eigen -DCMAKE_DISABLE_FIND_PACKAGE_Eigen3=ON)
set(installed "-DCMAKE_PREFIX_PATH=${prefix};${CMAKE_PREFIX_PATH}")
# For the build tree: clsa_DIR, and nothing of clsa on the prefix path.
set(build_tree "-Dclsa_DIR=${CLSA_BUILD_DIR}" "-DCMAKE_PREFIX_PATH=${CMAKE_PREFIX_PATH}")

# 1. Install; check what is there.
run_step(${CMAKE_COMMAND} --install "${CLSA_BUILD_DIR}" --prefix "${prefix}" ${config_args})
file(GLOB_RECURSE config_files "${prefix}/*/clsaConfig.cmake")
file(GLOB_RECURSE reference_targets "${prefix}/*/clsaCpuReferenceTargets.cmake")
if(NOT config_files OR NOT reference_targets OR NOT EXISTS "${prefix}/include/clsa/version.hpp"
   OR NOT EXISTS "${prefix}/include/clsa/cpu/attention.hpp")
  message(FATAL_ERROR "the install lacks clsaConfig.cmake, clsaCpuReferenceTargets.cmake or headers")
endif()
file(GLOB_RECURSE targets_files "${prefix}/*/clsaTargets*.cmake" "${CLSA_BUILD_DIR}/clsaTargets.cmake")
foreach(file IN LISTS targets_files)
  file(READ "${file}" text)
  if(text MATCHES "Eigen")
    message(FATAL_ERROR "${file} names Eigen: clsa::clsa must not need it")
  endif()
endforeach()
file(GLOB programs "${prefix}/bin/*")
if(CLSA_INSTALL_PROGRAMS AND NOT programs)
  message(FATAL_ERROR "CLSA_INSTALL_PROGRAMS=ON but no program was installed")
elseif(NOT CLSA_INSTALL_PROGRAMS AND programs)
  message(FATAL_ERROR "programs installed without CLSA_INSTALL_PROGRAMS: ${programs}")
endif()

# 2. Installed, Eigen hidden.
consumer(installed_no_eigen ${installed} ${no_eigen})
execute_process(COMMAND ${CMAKE_COMMAND} -S "${CLSA_CONSUMER_DIR}" -B "${CLSA_WORK_DIR}/installed_no_eigen_reference"
                        -G "${CLSA_GENERATOR}" ${installed} ${no_eigen} -DCLSA_CONSUMER_REFERENCE=ON
                RESULT_VARIABLE result OUTPUT_VARIABLE output ERROR_VARIABLE output)
if(result EQUAL 0 OR NOT output MATCHES "needs Eigen")
  message(FATAL_ERROR "COMPONENTS cpu_reference without Eigen should fail, saying why; got (${result}):\n${output}")
endif()
# 3. Installed, with the reference.
consumer(installed_reference ${installed} -DCLSA_CONSUMER_REFERENCE=ON)
# 4. The build tree.
consumer(build_tree_no_eigen ${build_tree} ${no_eigen})
consumer(build_tree_reference ${build_tree} -DCLSA_CONSUMER_REFERENCE=ON)
