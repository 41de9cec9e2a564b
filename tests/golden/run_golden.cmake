# Runs `olmoe logits` on a golden checkpoint and compares with the PyTorch
# reference's logits. -D: OLMOE, COMPARE, MODEL, TOKENS, K, ATOL, OUT, THREADS,
# optional WEIGHTS (native | int8; int8 checks only the tolerance, not argmax).
if(NOT WEIGHTS)
  set(WEIGHTS native)
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
execute_process(COMMAND ${COMPARE} ${OUT} ${MODEL}/ref_logits.k${K}.npy ${ATOL} ${_extra} RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "logits differ from the reference")
endif()
