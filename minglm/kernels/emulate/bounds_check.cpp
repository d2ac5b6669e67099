// Bounds harness for flash_attn.cu: run both kernels with every buffer allocated at exactly its size, so that
// AddressSanitizer (and UBSan) see any access outside a global array or the dynamic shared memory. Built and run
// by minglm/kernels/emulate.py (bounds_check), e.g.
//   g++ -std=c++20 -O0 -fsanitize=address,undefined -fno-sanitize-recover=all -DHEAD_DIM=64 bounds_check.cpp
// Arguments: the schedules to run (EmuSchedule numbers; default all three). Reads one case per line on stdin,
// "B H T sep_0 len_0 ... sep_B-1 len_B-1", fills q, k, v, dO with pseudo-random numbers and every padded row
// (t >= len_b) with NaN, and checks that the outputs are finite and that padded rows of o, lse, dq, dk, dv are
// exactly 0. Prints one line per case and schedule; exits 1 on any failure (and the sanitizers abort with their
// own report on a bad access).
#include "emulate_main.cpp"  // first: cuda_emulation.h must come before any system header

#include <cstdlib>

namespace {

struct Case {
    int B = 0, H = 0, T = 0;
    std::vector<int> sep, len;
};

float next_uniform(std::uint64_t& state) {  // a small LCG: reproducible inputs without <random> distributions
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return static_cast<float>((state >> 40) & 0xffffff) / 16777216.0f * 2.0f - 1.0f;
}

// Fill a (B, H, T, width) array: random for real rows, NaN for padded rows.
void fill(std::vector<float>& a, const Case& c, int width, std::uint64_t& state) {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    for (int b = 0; b < c.B; ++b)
        for (int h = 0; h < c.H; ++h)
            for (int t = 0; t < c.T; ++t)
                for (int d = 0; d < width; ++d) {
                    const std::size_t at = ((static_cast<std::size_t>(b) * c.H + h) * c.T + t) * width + d;
                    a[at] = (t < c.len[b]) ? next_uniform(state) : nan;
                }
}

// Count entries that break the contract: not finite, or (in a padded row) not exactly 0.
long bad_entries(const std::vector<float>& a, const Case& c, int width) {
    long bad = 0;
    for (int b = 0; b < c.B; ++b)
        for (int h = 0; h < c.H; ++h)
            for (int t = 0; t < c.T; ++t)
                for (int d = 0; d < width; ++d) {
                    const float x = a[((static_cast<std::size_t>(b) * c.H + h) * c.T + t) * width + d];
                    bad += !std::isfinite(x) || (t >= c.len[b] && x != 0.f);
                }
    return bad;
}

bool run_case(const Case& c, int schedule) {
    int consts[5];
    emu_consts(consts);
    const int fwd_floats = consts[0], bwd_floats = consts[1], fwd_bq = consts[2], bwd_bk = consts[3];
    const std::size_t rows = static_cast<std::size_t>(c.B) * c.H * c.T, n = rows * D;
    std::vector<float> q(n), k(n), v(n), dout(n), o(n), dq(n, 0.f), dk(n), dv(n), lse(rows), delta(rows);
    std::uint64_t state = 12345u + static_cast<std::uint64_t>(c.T);
    for (auto* a : {&q, &k, &v, &dout}) fill(*a, c, D, state);
    const float scale = 1.0f / std::sqrt(static_cast<float>(D));
    const unsigned gy = c.H, gz = c.B;
    int status = emu_fwd((c.T + fwd_bq - 1) / fwd_bq, gy, gz, NTHREADS, 4u * fwd_floats, schedule, 7u, q.data(),
                         k.data(), v.data(), c.sep.data(), c.len.data(), o.data(), lse.data(), c.H, c.T, scale);
    for (std::size_t r = 0; r < rows && status == 0; ++r) {  // delta = rowsum(dO * O), as the launcher computes it
        float s = 0.f;
        for (int d = 0; d < D; ++d) s += dout[r * D + d] * o[r * D + d];
        delta[r] = s;  // NaN in padded rows (dO is NaN there): the kernel must not read it
    }
    if (status == 0)
        status = emu_bwd((c.T + bwd_bk - 1) / bwd_bk, gy, gz, NTHREADS, 4u * bwd_floats, schedule, 11u, q.data(),
                         k.data(), v.data(), dout.data(), lse.data(), delta.data(), c.sep.data(), c.len.data(),
                         dq.data(), dk.data(), dv.data(), c.H, c.T, scale);
    if (status != 0) {
        std::printf("FAIL launch: %s\n", emu_last_error());
        return false;
    }
    const long bad = bad_entries(o, c, D) + bad_entries(lse, c, 1) + bad_entries(dq, c, D) + bad_entries(dk, c, D) +
                     bad_entries(dv, c, D);
    if (bad != 0) std::printf("FAIL %ld entries not finite, or not 0 in padding\n", bad);
    return bad == 0;
}

// Parse "B H T sep_0 len_0 ..." into c; false for a blank or malformed line.
bool parse_case(const char* line, Case& c) {
    char* end = nullptr;
    long numbers[3 + 2 * 64];
    int n = 0;
    for (const char* at = line; n < 3 + 2 * 64; at = end) {
        const long x = std::strtol(at, &end, 10);
        if (end == at) break;
        numbers[n++] = x;
    }
    if (n < 3 || n != 3 + 2 * numbers[0]) return false;
    c.B = static_cast<int>(numbers[0]);
    c.H = static_cast<int>(numbers[1]);
    c.T = static_cast<int>(numbers[2]);
    for (int b = 0; b < c.B; ++b) {
        c.sep.push_back(static_cast<int>(numbers[3 + 2 * b]));
        c.len.push_back(static_cast<int>(numbers[4 + 2 * b]));
    }
    return true;
}

}  // namespace

int main(int argc, char** argv) {
    std::vector<int> schedules;  // the schedules to run, from the command line (default: all)
    for (int a = 1; a < argc; ++a) schedules.push_back(std::atoi(argv[a]));
    if (schedules.empty()) schedules = {EMU_THREAD_ORDER, EMU_REVERSE_ORDER, EMU_WARP_RANDOM};
    char line[4096];
    bool ok = true;
    while (std::fgets(line, sizeof line, stdin) != nullptr) {
        line[std::strcspn(line, "\n")] = '\0';
        Case c;
        if (!parse_case(line, c)) continue;
        for (int schedule : schedules) {
            const bool case_ok = run_case(c, schedule);
            std::printf("%s D=%d schedule=%d case: %s\n", case_ok ? "ok" : "FAIL", D, schedule, line);
            ok = ok && case_ok;
        }
    }
    return ok ? 0 : 1;
}
