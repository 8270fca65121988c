/* Test-only shim for tests/run_determinism.sh: preloaded (LD_PRELOAD) into a process whose PyTorch links MKL, it
 * answers MKL's CPU-vendor check with "Intel", so that on an AMD (or other non-Intel) CPU MKL runs the same
 * instruction-set kernels (MKL_ENABLE_INSTRUCTIONS=SSE4_2|AVX2|AVX512) as on an Intel CPU, instead of its generic
 * ones.  Shapes that MKL's Intel kernels round differently (e.g. a [4, d] x [d, 8] against an [8, d] x [d, 8]
 * sgemm) then differ on this machine too.  Never used outside the tests. */
int mkl_serv_intel_cpu_true(void) { return 1; }
int mkl_serv_intel_cpu(void) { return 1; }
