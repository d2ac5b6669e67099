// Just enough of CUDA C to run minglm's attention kernels on a CPU, for testing the kernel source without a GPU.
//
// Every CUDA thread of a block is a fiber (ucontext) on one OS thread. A fiber runs until it reaches
// __syncthreads or __syncwarp, then hands control back to a small scheduler, which releases a barrier once every
// thread it concerns (the block, or the 32 lanes of a warp) is waiting there. When no fiber can run and some have
// not finished, the barriers are used inconsistently (a divergent __syncthreads, say): the launch stops with an
// error, where a GPU would hang or misbehave. Warp shuffles go through a per-warp exchange array between two warp
// barriers. Blocks run one after another.
//
// The order in which the scheduler runs the fibers is an option of each launch (EmuSchedule), because a missing
// barrier only shows when some thread runs ahead of another:
//   EMU_THREAD_ORDER  in rounds, threads 0, 1, ..., n-1, each up to its next barrier (warps move in lockstep);
//   EMU_REVERSE_ORDER the same rounds, threads n-1, ..., 0;
//   EMU_WARP_RANDOM   warps in a random order, each run alone until all its lanes wait at __syncthreads (or are
//                     done), its lanes in a fresh random order at every warp barrier. One warp thus runs far
//                     ahead of the others, as a real GPU may let it: a missing __syncthreads between the last
//                     read of a shared tile and its reload shows up as wrong numbers.
// What no schedule can show: memory-ordering races that a CPU running one fiber at a time never has, such as a
// __syncwarp whose only job is ordering shared-memory accesses around a warp shuffle (the emulated shuffle is
// itself a full warp barrier).
//
// Dynamic shared memory is allocated per launch with exactly the launch's byte count and filled with NaN before
// every block (a read of a word nobody wrote shows up in the results). Without AddressSanitizer a guard zone of
// canary words follows it and is checked after every block (a write past the end is an error); under
// AddressSanitizer (-fsanitize=address) there is no guard zone, so ASan sees any access past the end.
// The kernel source must name its dynamic shared memory `smem`; emulate_main.cpp maps that name onto the buffer.
//
// This checks indexing, masking, the tile loops and the barrier structure. It says nothing about speed. Used by
// minglm/kernels/emulate.py; not part of the library's runtime path.
#pragma once

// Switching fibers: makecontext/swapcontext start each fiber on its own stack, and after that _setjmp/_longjmp
// switch between them, because swapcontext makes a system call (it saves the signal mask) at every switch, which
// was about half the emulation's time. glibc's fortified longjmp refuses to jump to another stack, hence the
// #undef (before any header). Under AddressSanitizer every switch stays a swapcontext, which ASan understands.
#undef _FORTIFY_SOURCE
#if defined(__SANITIZE_ADDRESS__)
#define EMU_FAST_SWITCH 0
#else
#define EMU_FAST_SWITCH 1
#endif

#include <setjmp.h>
#include <ucontext.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <vector>
// (<functional>, <random>, <string> and <algorithm> are left out on purpose: they doubled the build time, and
// every scratch copy of the kernel in the barrier-deletion test is a build.)

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__
#define __restrict__
#define __launch_bounds__(...)

struct emu_dim3 {
    unsigned x = 0, y = 0, z = 0;
};
inline emu_dim3 threadIdx, blockIdx;

template <class T>
inline T min(T a, T b) { return b < a ? b : a; }
template <class T>
inline T max(T a, T b) { return a < b ? b : a; }

enum EmuWait { EMU_RUNNABLE = 0, EMU_BLOCK_BARRIER = 1, EMU_WARP_BARRIER = 2, EMU_DONE = 3 };
enum EmuSchedule { EMU_THREAD_ORDER = 0, EMU_REVERSE_ORDER = 1, EMU_WARP_RANDOM = 2 };

struct EmuFiber {
    ucontext_t context;  // how the fiber starts (and, under ASan, every switch)
    jmp_buf jump;        // where it waits, once started (EMU_FAST_SWITCH)
    bool started = false;
    std::vector<char> stack;
    int state = EMU_RUNNABLE;
};

#if defined(__SANITIZE_ADDRESS__)
constexpr std::size_t EMU_STACK_BYTES = 64 * 1024;  // ASan clears the shadow of a whole stack at every switch
constexpr std::size_t EMU_GUARD_WORDS = 0;          // AddressSanitizer watches the end of the exact-size buffer
#else
constexpr std::size_t EMU_STACK_BYTES = 256 * 1024;
constexpr std::size_t EMU_GUARD_WORDS = 64;
#endif
constexpr int EMU_MAX_WARPS = 32;
constexpr std::uint32_t EMU_CANARY = 0x7fc0dead;  // a quiet NaN with a recognisable payload

inline ucontext_t emu_scheduler;
inline jmp_buf emu_scheduler_jump;
inline std::vector<EmuFiber> emu_fibers;
inline unsigned emu_current = 0;
inline void (*emu_body)(const void*) = nullptr;  // runs the kernel call of the block being run ...
inline const void* emu_body_call = nullptr;       // ... which is this closure
inline float emu_shfl[EMU_MAX_WARPS][32];
inline char emu_error[512] = "";                  // why the last launch failed ("" when it did not)
inline float (*emu_dynamic_smem)[] = nullptr;     // the launch's dynamic shared memory (see emulate_main.cpp)

// A small, seeded random generator (splitmix64) and a Fisher-Yates shuffle for the warp-random schedule.
struct EmuRandom {
    std::uint64_t state;
    std::uint64_t next() {
        std::uint64_t z = (state += 0x9e3779b97f4a7c15ull);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        return z ^ (z >> 31);
    }
    void shuffle(unsigned* first, unsigned n) {
        for (unsigned i = n; i > 1; --i) {
            const unsigned j = static_cast<unsigned>(next() % i);
            const unsigned t = first[i - 1];
            first[i - 1] = first[j];
            first[j] = t;
        }
    }
};

inline void emu_wait(int kind) {
    EmuFiber& me = emu_fibers[emu_current];
    me.state = kind;
#if EMU_FAST_SWITCH
    if (_setjmp(me.jump) == 0) _longjmp(emu_scheduler_jump, 1);
#else
    swapcontext(&me.context, &emu_scheduler);
#endif
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
    emu_body(emu_body_call);
    emu_fibers[t].state = EMU_DONE;
#if EMU_FAST_SWITCH
    _longjmp(emu_scheduler_jump, 1);  // never return: the scheduler's ucontext is stale by now
#endif
    // (with swapcontext, returning resumes the scheduler through uc_link)
}

// Run fiber t until it waits at a barrier or finishes.
inline void emu_run_fiber(unsigned t) {
    emu_current = t;
    threadIdx = {t, 0, 0};
    EmuFiber& f = emu_fibers[t];
#if EMU_FAST_SWITCH
    if (_setjmp(emu_scheduler_jump) == 0) {  // the fiber comes back here with _longjmp
        if (f.started) _longjmp(f.jump, 1);
        f.started = true;
        swapcontext(&emu_scheduler, &f.context);  // first run: start it on its own stack
    }
#else
    swapcontext(&emu_scheduler, &f.context);
#endif
}

inline bool emu_deadlock(unsigned nthreads) {
    int n = std::snprintf(emu_error, sizeof emu_error,
                          "cuda_emulation: block (%u,%u,%u) cannot make progress (barriers used inconsistently); "
                          "thread states:", blockIdx.x, blockIdx.y, blockIdx.z);
    for (unsigned t = 0; t < nthreads && n > 0 && n < static_cast<int>(sizeof emu_error); ++t)
        n += std::snprintf(emu_error + n, sizeof emu_error - n, " %d", emu_fibers[t].state);
    return false;
}

// Release warp w when all its lanes wait at __syncwarp; true when it did.
inline bool emu_release_warp(unsigned w) {
    for (unsigned l = 0; l < 32; ++l)
        if (emu_fibers[w * 32 + l].state != EMU_WARP_BARRIER) return false;
    for (unsigned l = 0; l < 32; ++l) emu_fibers[w * 32 + l].state = EMU_RUNNABLE;
    return true;
}

// Warp-greedy: run warp w's lanes (shuffled at every pass) until none can run; true when any ran.
inline bool emu_run_warp_alone(unsigned w, EmuRandom& rng) {
    unsigned lanes[32];
    for (unsigned l = 0; l < 32; ++l) lanes[l] = l;
    bool ran_any = false;
    for (;;) {
        rng.shuffle(lanes, 32);
        bool ran = false;
        for (unsigned l : lanes) {
            if (emu_fibers[w * 32 + l].state != EMU_RUNNABLE) continue;
            emu_run_fiber(w * 32 + l);
            ran = true;
        }
        ran_any = ran_any || ran;
        if (!emu_release_warp(w) && !ran) return ran_any;
    }
}

// Run all threads of one block to completion; false (with emu_error set) when the barriers deadlock.
inline bool emu_run_block(unsigned nthreads, int schedule, EmuRandom& rng) {
    if (emu_fibers.size() < nthreads) emu_fibers.resize(nthreads);
    for (unsigned t = 0; t < nthreads; ++t) {
        EmuFiber& f = emu_fibers[t];
        f.stack.resize(EMU_STACK_BYTES);
        f.state = EMU_RUNNABLE;
        f.started = false;
        getcontext(&f.context);
        f.context.uc_stack.ss_sp = f.stack.data();
        f.context.uc_stack.ss_size = f.stack.size();
        f.context.uc_link = &emu_scheduler;
        makecontext(&f.context, reinterpret_cast<void (*)()>(emu_fiber_entry), 1, static_cast<int>(t));
    }
    const unsigned nwarps = nthreads / 32;
    unsigned warps[EMU_MAX_WARPS];
    for (unsigned w = 0; w < nwarps; ++w) warps[w] = w;
    for (;;) {
        bool ran = false;
        if (schedule == EMU_WARP_RANDOM) {
            rng.shuffle(warps, nwarps);
            for (unsigned i = 0; i < nwarps; ++i) ran = emu_run_warp_alone(warps[i], rng) || ran;
        } else {
            for (unsigned n = 0; n < nthreads; ++n) {
                const unsigned t = (schedule == EMU_REVERSE_ORDER) ? nthreads - 1 - n : n;
                if (emu_fibers[t].state != EMU_RUNNABLE) continue;
                emu_run_fiber(t);
                ran = true;
            }
        }
        unsigned done = 0, at_block = 0;
        for (unsigned t = 0; t < nthreads; ++t) {
            done += emu_fibers[t].state == EMU_DONE;
            at_block += emu_fibers[t].state == EMU_BLOCK_BARRIER;
        }
        if (done == nthreads) return true;
        bool released = false;
        if (at_block == nthreads) {  // __syncthreads: every thread of the block has arrived
            for (unsigned t = 0; t < nthreads; ++t) emu_fibers[t].state = EMU_RUNNABLE;
            released = true;
        }
        for (unsigned w = 0; w < nwarps; ++w) released = emu_release_warp(w) || released;
        if (!ran && !released) return emu_deadlock(nthreads);
    }
}

// Run kernel(args...) on a grid of (gx, gy, gz) blocks of nthreads threads (a multiple of 32) with smem_bytes of
// dynamic shared memory. Returns 0, or 1 with the reason in emu_error.
template <class Kernel, class... Args>
int emu_launch(unsigned gx, unsigned gy, unsigned gz, unsigned nthreads, unsigned smem_bytes, int schedule,
               unsigned seed, Kernel kernel, Args... args) {
    emu_error[0] = '\0';
    if (nthreads == 0 || nthreads % 32 != 0 || nthreads / 32 > EMU_MAX_WARPS) {
        std::snprintf(emu_error, sizeof emu_error,
                      "cuda_emulation: %u threads per block is not a multiple of 32 up to 1024", nthreads);
        return 1;
    }
    if (schedule < EMU_THREAD_ORDER || schedule > EMU_WARP_RANDOM) {
        std::snprintf(emu_error, sizeof emu_error, "cuda_emulation: unknown schedule %d", schedule);
        return 1;
    }
    const std::size_t words = (smem_bytes + 3) / 4;
    std::vector<float> shared(words + EMU_GUARD_WORDS);  // exactly the launch's size (plus the guard zone)
    emu_dynamic_smem = reinterpret_cast<float(*)[]>(shared.data());
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const float canary = __int_as_float(EMU_CANARY);
    EmuRandom rng{seed};
    const auto call = [=] { kernel(args...); };
    using Call = decltype(call);
    emu_body_call = &call;
    emu_body = [](const void* c) { (*static_cast<const Call*>(c))(); };
    int status = 0;
    for (unsigned z = 0; z < gz && status == 0; ++z)
        for (unsigned y = 0; y < gy && status == 0; ++y)
            for (unsigned x = 0; x < gx && status == 0; ++x) {
                blockIdx = {x, y, z};
                for (std::size_t g = 0; g < shared.size(); ++g) shared[g] = (g < words) ? nan : canary;
                if (!emu_run_block(nthreads, schedule, rng)) status = 1;
                for (std::size_t g = words; g < shared.size() && status == 0; ++g) {
                    std::uint32_t bits;
                    std::memcpy(&bits, &shared[g], sizeof bits);
                    if (bits != EMU_CANARY) {
                        std::snprintf(emu_error, sizeof emu_error,
                                      "cuda_emulation: block (%u,%u,%u) wrote past the end of its %u B of dynamic "
                                      "shared memory (word %zu)", x, y, z, smem_bytes, g);
                        status = 1;
                    }
                }
            }
    emu_dynamic_smem = nullptr;
    emu_body_call = nullptr;
    return status;
}
