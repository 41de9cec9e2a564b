# `olmoe logits --expert-parallel` under mpirun gives the bytes of one
# process, at every k in KS and every rank count in NPS, with the same
# olmoe options on both sides (e.g. --weights int8 --act int8).
# -D: OLMOE, COMPARE, MPIEXEC, MPIFLAGS (|-separated), MODEL, TOKENS, KS and
# NPS (comma-separated), DIR (for the .npy files; one per test, so tests run
# in parallel do not overwrite each other's), optional OPTIONS (olmoe
# options, |-separated).
file(MAKE_DIRECTORY ${DIR})
string(REPLACE "," ";" _ks "${KS}")
string(REPLACE "," ";" _nps "${NPS}")
string(REPLACE "|" ";" _flags "${MPIFLAGS}")
string(REPLACE "|" ";" _opts "${OPTIONS}")
string(REPLACE "|" " " _optnames "${OPTIONS}")
foreach(_k IN LISTS _ks)
  set(_ref ${DIR}/one_process_k${_k}.npy)
  execute_process(COMMAND ${OLMOE} logits --model ${MODEL} --tokens ${TOKENS} --k ${_k} --threads 2 ${_opts}
                          --out ${_ref}
                  RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "olmoe logits (one process, k = ${_k}) failed (${rc})")
  endif()
  foreach(_np IN LISTS _nps)
    set(_out ${DIR}/expert_parallel_np${_np}_k${_k}.npy)
    file(REMOVE ${_out})
    execute_process(COMMAND ${MPIEXEC} -np ${_np} ${_flags} ${OLMOE} logits --model ${MODEL} --tokens ${TOKENS}
                            --k ${_k} --threads 1 ${_opts} --expert-parallel --out ${_out}
                    RESULT_VARIABLE rc)
    if(NOT rc EQUAL 0)
      message(FATAL_ERROR "mpirun -np ${_np} olmoe logits --expert-parallel (k = ${_k}) failed (${rc})")
    endif()
    execute_process(COMMAND ${COMPARE} ${_out} ${_ref} 0 RESULT_VARIABLE rc)
    if(NOT rc EQUAL 0)
      message(FATAL_ERROR "k = ${_k}, ${_np} ranks (options: ${_optnames}): logits differ from one process")
    endif()
    message(STATUS "k = ${_k}, ${_np} ranks (options: ${_optnames}): the bytes of one process")
  endforeach()
endforeach()
