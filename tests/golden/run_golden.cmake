# Runs `olmoe logits` on a golden checkpoint and compares with the PyTorch
# reference's logits. -D: OLMOE, COMPARE, MODEL, TOKENS, K, ATOL, OUT, THREADS,
# optional WEIGHTS (native | int8; int8 checks only the tolerance, not argmax),
# REF_DIR (where ref_logits.k<K>.npy is; default MODEL), TOKENS_FILE (the ids,
# comma-separated, instead of TOKENS), SKIP_IF_MISSING (a missing checkpoint or
# golden file prints KDIAL_SKIP and ends the script: the test's
# SKIP_REGULAR_EXPRESSION marks it skipped).
if(NOT WEIGHTS)
  set(WEIGHTS native)
endif()
if(NOT REF_DIR)
  set(REF_DIR ${MODEL})
endif()
if(SKIP_IF_MISSING)
  foreach(_f IN ITEMS ${MODEL}/config.json ${REF_DIR}/ref_logits.k${K}.npy ${TOKENS_FILE})
    if(NOT EXISTS ${_f})
      message("KDIAL_SKIP: ${_f} is missing (examples/phds/make_golden.py writes the golden files)")
      return()
    endif()
  endforeach()
endif()
if(TOKENS_FILE)
  file(READ ${TOKENS_FILE} TOKENS)
  string(STRIP "${TOKENS}" TOKENS)
endif()
execute_process(COMMAND ${OLMOE} logits --model ${MODEL} --tokens ${TOKENS} --k ${K} --threads ${THREADS}
                        --weights ${WEIGHTS} --out ${OUT} RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "olmoe logits failed (${rc})")
endif()
set(_extra)
if(WEIGHTS STREQUAL "int8")
  set(_extra --any-argmax)
endif()
execute_process(COMMAND ${COMPARE} ${OUT} ${REF_DIR}/ref_logits.k${K}.npy ${ATOL} ${_extra} RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "logits differ from the reference")
endif()
