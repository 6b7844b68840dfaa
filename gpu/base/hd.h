/* KVS_HD marks small inline functions shared by the CPU reference and the CUDA kernels
 * (STYLE: GPU code; ggml-common.h's pattern): __host__ __device__ under nvcc, plain
 * static inline in C. Anything defined with it must compute bit-identical results on
 * both sides, so it uses no libm calls whose rounding differs between them. */
#ifndef KVS_BASE_HD_H
#define KVS_BASE_HD_H

#ifdef __CUDACC__
#define KVS_HD static inline __host__ __device__
#else
#define KVS_HD static inline
#endif

#endif
