// Entry points for running flash_attn.cu on the CPU through cuda_emulation.h (see minglm/kernels/emulate.py).
// Built with: g++ -std=c++20 -O1 -shared -fPIC -DHEAD_DIM=<D> emulate_main.cpp -o libemu_<D>.so
#include "cuda_emulation.h"

float smem[1 << 16];  // the block's dynamic shared memory (256 KiB, more than any kernel here asks for)

#include "../flash_attn.cu"

extern "C" void emu_consts(int* out) {
    threadIdx = {0, 0, 0};
    smem_floats(out);
}

// The grid and block come from the caller, as they would in a CUDA launch, so a wrong grid shows up in results.
extern "C" void emu_fwd(unsigned gx, unsigned gy, unsigned gz, unsigned nthreads, const float* q, const float* k,
                        const float* v, const int* sep, const int* len, float* o, float* lse, int H, int T,
                        float scale) {
    emu_launch(gx, gy, gz, nthreads, glm_attn_fwd, q, k, v, sep, len, o, lse, H, T, scale);
}

extern "C" void emu_bwd(unsigned gx, unsigned gy, unsigned gz, unsigned nthreads, const float* q, const float* k,
                        const float* v, const float* dout, const float* lse, const float* delta, const int* sep,
                        const int* len, float* dq, float* dk, float* dv, int H, int T, float scale) {
    emu_launch(gx, gy, gz, nthreads, glm_attn_bwd, q, k, v, dout, lse, delta, sep, len, dq, dk, dv, H, T, scale);
}
