// Just enough of CUDA C to run minglm's attention kernels on a CPU, for testing the kernel source without a GPU.
//
// Every CUDA thread of a block is a fiber (ucontext) on one OS thread. A fiber runs until it reaches
// __syncthreads or __syncwarp, then hands control back to a small scheduler, which releases a barrier once every
// thread it concerns (the block, or the 32 lanes of a warp) is waiting there. When no fiber can run and some have
// not finished, the barriers are used inconsistently (a divergent __syncthreads, say): that is reported and the
// process aborts, where a GPU would hang or misbehave. Warp shuffles go through a per-warp exchange array between
// two warp barriers. Blocks run one after another, so one global array serves as dynamic shared memory.
//
// This checks indexing, masking, the tile loops and the barrier structure. It says nothing about speed, and as the
// schedule is fixed it cannot expose data races that depend on a GPU's timing. Used by minglm/kernels/emulate.py;
// not part of the library's runtime path.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__
#define __restrict__
#define __launch_bounds__(n)

struct emu_dim3 {
    unsigned x = 0, y = 0, z = 0;
};
inline emu_dim3 threadIdx, blockIdx;

using std::max;
using std::min;

enum EmuWait { EMU_RUNNABLE = 0, EMU_BLOCK_BARRIER = 1, EMU_WARP_BARRIER = 2, EMU_DONE = 3 };

struct EmuFiber {
    ucontext_t context;
    std::vector<char> stack;
    int state = EMU_RUNNABLE;
};

constexpr std::size_t EMU_STACK_BYTES = 256 * 1024;
constexpr int EMU_MAX_WARPS = 32;
inline ucontext_t emu_scheduler;
inline std::vector<EmuFiber> emu_fibers;
inline unsigned emu_current = 0;
inline std::function<void()> emu_body;  // the kernel call of the block being run
inline float emu_shfl[EMU_MAX_WARPS][32];

inline void emu_wait(int kind) {
    EmuFiber& me = emu_fibers[emu_current];
    me.state = kind;
    swapcontext(&me.context, &emu_scheduler);
}

inline float __int_as_float(unsigned int bits) {
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}
inline void __syncthreads() { emu_wait(EMU_BLOCK_BARRIER); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu_wait(EMU_WARP_BARRIER); }
inline float __shfl_xor_sync(unsigned, float value, int lane_mask) {
    const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    emu_shfl[warp][lane] = value;
    __syncwarp();
    const float other = emu_shfl[warp][lane ^ lane_mask];
    __syncwarp();  // nobody overwrites the exchange slot before everyone has read it
    return other;
}
inline float atomicAdd(float* address, float value) {  // one OS thread: a plain add is atomic
    const float old = *address;
    *address = old + value;
    return old;
}

inline void emu_fiber_entry(int t) {
    emu_body();
    emu_fibers[t].state = EMU_DONE;  // returning resumes the scheduler through uc_link
}

[[noreturn]] inline void emu_deadlock(unsigned nthreads) {
    std::fprintf(stderr, "cuda_emulation: block (%u,%u,%u) cannot make progress; thread states:", blockIdx.x,
                 blockIdx.y, blockIdx.z);
    for (unsigned t = 0; t < nthreads; ++t) std::fprintf(stderr, " %d", emu_fibers[t].state);
    std::fprintf(stderr, "\n");
    std::abort();
}

// Run all threads of one block to completion.
inline void emu_run_block(unsigned nthreads) {
    if (emu_fibers.size() < nthreads) emu_fibers.resize(nthreads);
    for (unsigned t = 0; t < nthreads; ++t) {
        EmuFiber& f = emu_fibers[t];
        f.stack.resize(EMU_STACK_BYTES);
        f.state = EMU_RUNNABLE;
        getcontext(&f.context);
        f.context.uc_stack.ss_sp = f.stack.data();
        f.context.uc_stack.ss_size = f.stack.size();
        f.context.uc_link = &emu_scheduler;
        makecontext(&f.context, reinterpret_cast<void (*)()>(emu_fiber_entry), 1, static_cast<int>(t));
    }
    for (;;) {
        bool ran = false;
        for (unsigned t = 0; t < nthreads; ++t) {
            if (emu_fibers[t].state != EMU_RUNNABLE) continue;
            emu_current = t;
            threadIdx = {t, 0, 0};
            swapcontext(&emu_scheduler, &emu_fibers[t].context);
            ran = true;
        }
        unsigned done = 0, at_block = 0;
        for (unsigned t = 0; t < nthreads; ++t) {
            done += emu_fibers[t].state == EMU_DONE;
            at_block += emu_fibers[t].state == EMU_BLOCK_BARRIER;
        }
        if (done == nthreads) return;
        bool released = false;
        if (at_block == nthreads) {  // __syncthreads: every thread of the block has arrived
            for (unsigned t = 0; t < nthreads; ++t) emu_fibers[t].state = EMU_RUNNABLE;
            released = true;
        }
        for (unsigned w = 0; w * 32 < nthreads; ++w) {  // __syncwarp: all 32 lanes of warp w have arrived
            bool all = true;
            for (unsigned l = 0; l < 32; ++l) all = all && emu_fibers[w * 32 + l].state == EMU_WARP_BARRIER;
            if (all) {
                for (unsigned l = 0; l < 32; ++l) emu_fibers[w * 32 + l].state = EMU_RUNNABLE;
                released = true;
            }
        }
        if (!ran && !released) emu_deadlock(nthreads);
    }
}

// Run kernel(args...) on a grid of (gx, gy, gz) blocks of nthreads threads (a multiple of 32).
template <class Kernel, class... Args>
void emu_launch(unsigned gx, unsigned gy, unsigned gz, unsigned nthreads, Kernel kernel, Args... args) {
    if (nthreads == 0 || nthreads % 32 != 0 || nthreads / 32 > EMU_MAX_WARPS) {
        std::fprintf(stderr, "cuda_emulation: %u threads per block is not a multiple of 32 up to 1024\n", nthreads);
        std::abort();
    }
    emu_body = [=] { kernel(args...); };
    for (unsigned z = 0; z < gz; ++z)
        for (unsigned y = 0; y < gy; ++y)
            for (unsigned x = 0; x < gx; ++x) {
                blockIdx = {x, y, z};
                emu_run_block(nthreads);
            }
}
