// Runtime instruction-set dispatch for the CPU kernels' hot loops (no torch here).
//
// The extension is compiled for the baseline x86-64 ISA (SSE2) so that one build runs on every
// x86-64 CPU. A function marked PYA_CPU_CLONES is compiled three times, for x86-64-v4 (AVX-512),
// x86-64-v3 (AVX2 + FMA) and the baseline, and the loader picks the best one the CPU has (GCC's
// target_clones, an ifunc). Mark the function that holds a whole hot loop (a range of rows): the
// PYA_INLINE helpers it calls are inlined into each clone and so compiled for its ISA too.
// Measured on a 2-core Xeon (AMX, AVX-512): the InfoNCE forward at the CPC-AD shape 106 -> 66 ms.
// Elsewhere (clang, MSVC, non-x86, or -DPYANOMALY_NO_CPU_CLONES) the functions are compiled once.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(PYANOMALY_NO_CPU_CLONES)
#define PYA_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PYA_CPU_CLONES
#endif

#if defined(__GNUC__) || defined(__clang__)
#define PYA_INLINE inline __attribute__((always_inline))
#else
#define PYA_INLINE inline
#endif
