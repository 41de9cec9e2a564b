# Runs `olmoe logits` on a golden checkpoint and compares with the PyTorch
# reference's logits. -D: OLMOE, COMPARE, MODEL, TOKENS, K, ATOL, OUT, THREADS.
execute_process(COMMAND ${OLMOE} logits --model ${MODEL} --tokens ${TOKENS} --k ${K} --threads ${THREADS}
                        --out ${OUT} RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "olmoe logits failed (${rc})")
endif()
execute_process(COMMAND ${COMPARE} ${OUT} ${MODEL}/ref_logits.k${K}.npy ${ATOL} RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "logits differ from the reference")
endif()
