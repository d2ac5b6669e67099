// Entry points for running flash_attn.cu on the CPU through cuda_emulation.h (see minglm/kernels/emulate.py).
// Built with: g++ -std=c++20 -O1 -shared -fPIC -DHEAD_DIM=<D> [-DSMALL_TILES=1] emulate_main.cpp -o libemu_<D>.so
// -DEMU_KERNEL_SOURCE='"path.cu"' runs another copy of the kernel source (the barrier-deletion tests use it).
#include "cuda_emulation.h"

// The kernels declare `extern __shared__ float smem[];`. Here that name becomes the launch's exact-size buffer:
// `extern float (*emu_dynamic_smem)[];` is a valid declaration, and `(*emu_dynamic_smem)` decays to a float*.
#define smem (*emu_dynamic_smem)
#ifdef EMU_KERNEL_SOURCE
#include EMU_KERNEL_SOURCE
#else
#include "../flash_attn.cu"
#endif
#undef smem

// The tile constants, as the smem_floats kernel reports them to cuda.py.
extern "C" void emu_consts(int* out) {
    threadIdx = {0, 0, 0};
    smem_floats(out);
}

extern "C" const char* emu_last_error() { return emu_error; }

// The grid, block and shared-memory size come from the caller, as they would in a CUDA launch, so a wrong grid or
// too little shared memory shows up in the results. Each returns 0, or 1 with the reason in emu_last_error().
extern "C" int emu_fwd(unsigned gx, unsigned gy, unsigned gz, unsigned nthreads, unsigned smem_bytes, int schedule,
                       unsigned seed, const float* q, const float* k, const float* v, const int* sep, const int* len,
                       float* o, float* lse, int H, int T, float scale) {
    return emu_launch(gx, gy, gz, nthreads, smem_bytes, schedule, seed, glm_attn_fwd, q, k, v, sep, len, o, lse, H, T,
                      scale);
}

extern "C" int emu_bwd(unsigned gx, unsigned gy, unsigned gz, unsigned nthreads, unsigned smem_bytes, int schedule,
                       unsigned seed, const float* q, const float* k, const float* v, const float* dout,
                       const float* lse, const float* delta, const int* sep, const int* len, float* dq, float* dk,
                       float* dv, int H, int T, float scale) {
    return emu_launch(gx, gy, gz, nthreads, smem_bytes, schedule, seed, glm_attn_bwd, q, k, v, dout, lse, delta, sep,
                      len, dq, dk, dv, H, T, scale);
}
