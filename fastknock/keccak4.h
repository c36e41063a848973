/*
 * keccak4.h -- four Keccak-f[1600] permutations at once (AVX2), for batches of MACs.
 *
 * Design:
 * - A flood of forged KNOCKs costs one HMAC-SHA3-256 each (two permutations: keccak.h),
 *   and the batched receive path reads them up to 64 at a time. Four independent states
 *   go through one permutation in the four 64-bit lanes of 25 AVX2 registers: the same
 *   instruction count as one scalar permutation, so up to four MACs for the price of
 *   about one and a half (bench/bench_mac_x4.py).
 * - The round follows FIPS 202 (theta, rho and pi into B, chi, iota) on the same lane
 *   names as keccak.h (row letters b,g,k,m,s are y = 0..4, columns a,e,i,o,u are x);
 *   no lane complementing, because AVX2 has and-not in one instruction. Rotations are a
 *   shift pair (AVX2 has no 64-bit rotate).
 * - Only the x86-64 AVX2 build is vector code: `fk_x4_supported()` asks the CPU at run
 *   time (the extension is built for baseline x86-64, the function carries its own
 *   target attribute). Elsewhere the same entry point runs four scalar permutations, so
 *   callers have one path.
 * - Input states are copied in and only lanes 0..3 of each result (a SHA3-256 digest,
 *   as lanes) come out; the vector registers are cleared before return (they hold keyed
 *   state in the HMAC use).
 *
 * Verified against the scalar permutation and hashlib.sha3_256 by tests/test_mac_x4.py.
 */
#ifndef FASTKNOCK_KECCAK4_H
#define FASTKNOCK_KECCAK4_H

#include <stdint.h>

#include "keccak.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FK_X4_AVX2 1
#include <immintrin.h>

#define FK_X4_XOR(a, b) _mm256_xor_si256((a), (b))
#define FK_X4_ANDN(a, b) _mm256_andnot_si256((a), (b)) /* ~a & b */
#define FK_X4_ROL(v, n) _mm256_or_si256(_mm256_slli_epi64((v), (n)), _mm256_srli_epi64((v), 64 - (n)))
#define FK_X4_XOR5(a, b, c, d, e) FK_X4_XOR(FK_X4_XOR(FK_X4_XOR(a, b), FK_X4_XOR(c, d)), e)
#define FK_X4_CHI(E, x0, x1, x2, x3, x4)                                                  \
    do {                                                                                   \
        E##x0 = FK_X4_XOR(B0, FK_X4_ANDN(B1, B2));                                         \
        E##x1 = FK_X4_XOR(B1, FK_X4_ANDN(B2, B3));                                         \
        E##x2 = FK_X4_XOR(B2, FK_X4_ANDN(B3, B4));                                         \
        E##x3 = FK_X4_XOR(B3, FK_X4_ANDN(B4, B0));                                         \
        E##x4 = FK_X4_XOR(B4, FK_X4_ANDN(B0, B1));                                         \
    } while (0)

/* One round from the lanes A##xx into E##xx; rc is the round constant as a vector. */
#define FK_X4_ROUND(rc, A, E)                                                              \
    do {                                                                                   \
        __m256i Ca, Ce, Ci, Co, Cu, Da, De, Di, Do, Du, B0, B1, B2, B3, B4;                \
        Ca = FK_X4_XOR5(A##ba, A##ga, A##ka, A##ma, A##sa);                                \
        Ce = FK_X4_XOR5(A##be, A##ge, A##ke, A##me, A##se);                                \
        Ci = FK_X4_XOR5(A##bi, A##gi, A##ki, A##mi, A##si);                                \
        Co = FK_X4_XOR5(A##bo, A##go, A##ko, A##mo, A##so);                                \
        Cu = FK_X4_XOR5(A##bu, A##gu, A##ku, A##mu, A##su);                                \
        Da = FK_X4_XOR(Cu, FK_X4_ROL(Ce, 1));                                              \
        De = FK_X4_XOR(Ca, FK_X4_ROL(Ci, 1));                                              \
        Di = FK_X4_XOR(Ce, FK_X4_ROL(Co, 1));                                              \
        Do = FK_X4_XOR(Ci, FK_X4_ROL(Cu, 1));                                              \
        Du = FK_X4_XOR(Co, FK_X4_ROL(Ca, 1));                                              \
        B0 = FK_X4_XOR(A##ba, Da);                                                         \
        B1 = FK_X4_ROL(FK_X4_XOR(A##ge, De), 44);                                          \
        B2 = FK_X4_ROL(FK_X4_XOR(A##ki, Di), 43);                                          \
        B3 = FK_X4_ROL(FK_X4_XOR(A##mo, Do), 21);                                          \
        B4 = FK_X4_ROL(FK_X4_XOR(A##su, Du), 14);                                          \
        FK_X4_CHI(E, ba, be, bi, bo, bu);                                                  \
        E##ba = FK_X4_XOR(E##ba, (rc));                                                    \
        B0 = FK_X4_ROL(FK_X4_XOR(A##bo, Do), 28);                                          \
        B1 = FK_X4_ROL(FK_X4_XOR(A##gu, Du), 20);                                          \
        B2 = FK_X4_ROL(FK_X4_XOR(A##ka, Da), 3);                                           \
        B3 = FK_X4_ROL(FK_X4_XOR(A##me, De), 45);                                          \
        B4 = FK_X4_ROL(FK_X4_XOR(A##si, Di), 61);                                          \
        FK_X4_CHI(E, ga, ge, gi, go, gu);                                                  \
        B0 = FK_X4_ROL(FK_X4_XOR(A##be, De), 1);                                           \
        B1 = FK_X4_ROL(FK_X4_XOR(A##gi, Di), 6);                                           \
        B2 = FK_X4_ROL(FK_X4_XOR(A##ko, Do), 25);                                          \
        B3 = FK_X4_ROL(FK_X4_XOR(A##mu, Du), 8);                                           \
        B4 = FK_X4_ROL(FK_X4_XOR(A##sa, Da), 18);                                          \
        FK_X4_CHI(E, ka, ke, ki, ko, ku);                                                  \
        B0 = FK_X4_ROL(FK_X4_XOR(A##bu, Du), 27);                                          \
        B1 = FK_X4_ROL(FK_X4_XOR(A##ga, Da), 36);                                          \
        B2 = FK_X4_ROL(FK_X4_XOR(A##ke, De), 10);                                          \
        B3 = FK_X4_ROL(FK_X4_XOR(A##mi, Di), 15);                                          \
        B4 = FK_X4_ROL(FK_X4_XOR(A##so, Do), 56);                                          \
        FK_X4_CHI(E, ma, me, mi, mo, mu);                                                  \
        B0 = FK_X4_ROL(FK_X4_XOR(A##bi, Di), 62);                                          \
        B1 = FK_X4_ROL(FK_X4_XOR(A##go, Do), 55);                                          \
        B2 = FK_X4_ROL(FK_X4_XOR(A##ku, Du), 39);                                          \
        B3 = FK_X4_ROL(FK_X4_XOR(A##ma, Da), 41);                                          \
        B4 = FK_X4_ROL(FK_X4_XOR(A##se, De), 2);                                           \
        FK_X4_CHI(E, sa, se, si, so, su);                                                  \
    } while (0)

#define FK_X4_LANES(P)                                                                     \
    __m256i P##ba, P##be, P##bi, P##bo, P##bu, P##ga, P##ge, P##gi, P##go, P##gu;          \
    __m256i P##ka, P##ke, P##ki, P##ko, P##ku, P##ma, P##me, P##mi, P##mo, P##mu;          \
    __m256i P##sa, P##se, P##si, P##so, P##su

/* Lane i of the four states as one vector (state j in 64-bit element j). */
#define FK_X4_GATHER(in, i) _mm256_set_epi64x((long long)(in)[3][i], (long long)(in)[2][i], \
                                              (long long)(in)[1][i], (long long)(in)[0][i])

__attribute__((target("avx2"))) static void fk_keccakf1600_x4_avx2(
    const uint64_t *const in[4], uint64_t out[4][4]) {
    FK_X4_LANES(A);
    FK_X4_LANES(E);
    __m256i d0, d1, d2, d3, t0, t1, t2, t3;
    Aba = FK_X4_GATHER(in, 0);  Abe = FK_X4_GATHER(in, 1);  Abi = FK_X4_GATHER(in, 2);
    Abo = FK_X4_GATHER(in, 3);  Abu = FK_X4_GATHER(in, 4);  Aga = FK_X4_GATHER(in, 5);
    Age = FK_X4_GATHER(in, 6);  Agi = FK_X4_GATHER(in, 7);  Ago = FK_X4_GATHER(in, 8);
    Agu = FK_X4_GATHER(in, 9);  Aka = FK_X4_GATHER(in, 10); Ake = FK_X4_GATHER(in, 11);
    Aki = FK_X4_GATHER(in, 12); Ako = FK_X4_GATHER(in, 13); Aku = FK_X4_GATHER(in, 14);
    Ama = FK_X4_GATHER(in, 15); Ame = FK_X4_GATHER(in, 16); Ami = FK_X4_GATHER(in, 17);
    Amo = FK_X4_GATHER(in, 18); Amu = FK_X4_GATHER(in, 19); Asa = FK_X4_GATHER(in, 20);
    Ase = FK_X4_GATHER(in, 21); Asi = FK_X4_GATHER(in, 22); Aso = FK_X4_GATHER(in, 23);
    Asu = FK_X4_GATHER(in, 24);
    for (int i = 0; i < 24; i += 2) {
        FK_X4_ROUND(_mm256_set1_epi64x((long long)fk_keccak_rc[i]), A, E);
        FK_X4_ROUND(_mm256_set1_epi64x((long long)fk_keccak_rc[i + 1]), E, A);
    }
    /* Lanes 0..3 of every state: a 4x4 transpose of (Aba, Abe, Abi, Abo). */
    t0 = _mm256_unpacklo_epi64(Aba, Abe); /* ba0 be0 ba2 be2 */
    t1 = _mm256_unpackhi_epi64(Aba, Abe); /* ba1 be1 ba3 be3 */
    t2 = _mm256_unpacklo_epi64(Abi, Abo); /* bi0 bo0 bi2 bo2 */
    t3 = _mm256_unpackhi_epi64(Abi, Abo); /* bi1 bo1 bi3 bo3 */
    d0 = _mm256_permute2x128_si256(t0, t2, 0x20);
    d1 = _mm256_permute2x128_si256(t1, t3, 0x20);
    d2 = _mm256_permute2x128_si256(t0, t2, 0x31);
    d3 = _mm256_permute2x128_si256(t1, t3, 0x31);
    _mm256_storeu_si256((__m256i *)out[0], d0);
    _mm256_storeu_si256((__m256i *)out[1], d1);
    _mm256_storeu_si256((__m256i *)out[2], d2);
    _mm256_storeu_si256((__m256i *)out[3], d3);
    /* The vector registers held keyed state: cleared (spill slots on the stack are beyond
     * our reach, as in keccak.h). */
    _mm256_zeroall();
}

static inline int fk_x4_supported(void) {
    static int known = -1;
    if (known < 0) known = __builtin_cpu_supports("avx2") ? 1 : 0;
    return known;
}
#else
static inline int fk_x4_supported(void) { return 0; }
#endif

/*
 * The permutation of the four states in[0..3] (25 lanes each, not modified), writing
 * lanes 0..3 of each result to out[j]. `vector` = 0 forces the scalar path (tests, the
 * baseline of the benchmark); with AVX2 absent it is the scalar path anyway.
 */
static inline void fk_keccakf1600_x4_out4(const uint64_t *const in[4], uint64_t out[4][4],
                                          int vector) {
#ifdef FK_X4_AVX2
    if (vector && fk_x4_supported()) {
        fk_keccakf1600_x4_avx2(in, out);
        return;
    }
#else
    (void)vector;
#endif
    for (int j = 0; j < 4; j++) fk_keccakf1600_out4(in[j], out[j]);
}

#endif /* FASTKNOCK_KECCAK4_H */
