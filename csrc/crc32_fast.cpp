#include "crc32_fast.h"

#include <zlib.h>

#include <cstring>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define SHARDCKPT_CRC_X86 1
#include <immintrin.h>
#else
#define SHARDCKPT_CRC_X86 0
#endif

namespace shardckpt {
namespace {

uint32_t crc32_zlib(uint32_t crc, const uint8_t* p, size_t n) {
  // crc32_z takes a size_t length, so no 4 GiB chunking is needed.
  return static_cast<uint32_t>(::crc32_z(crc, p, n));
}

#if SHARDCKPT_CRC_X86

// The method is Intel's "Fast CRC Computation for Generic Polynomials Using
// PCLMULQDQ Instruction" (2009), in the bit-reflected domain, where a
// little-endian 128-bit load holds the highest-degree coefficient in bit 0.
//
// A 128-bit chunk X followed by D more message bits contributes X * x^D.
// With X = A * x^64 + B (A: the first 8 bytes), X * x^D is congruent mod P to
// A * (x^(D+64) mod P) + B * (x^D mod P), a product of under 128 bits that is
// xored into the chunk D bits further on. A lane constant holds x^n mod P with
// degree d at bit 32 - d (33 bits: x^0 is bit 32); PCLMULQDQ's product of a
// reflected 64-bit half and such a constant then reads, as a reflected
// 128-bit value, as the true product times x^32, so each constant is taken
// for n - 32: the fold over D bits uses x^(D+32) on the first half and
// x^(D-32) on the second. tests/test_crc32_fast.py recomputes every constant
// below from the polynomial.
//
// The initial value enters as zlib's does: xoring the inverted running crc
// into the first 4 bytes is the same as starting the register there. Folding
// keeps the value congruent to the message mod P, so the raw crc of the last
// 16-byte remainder is the raw crc of everything folded; zlib's crc32_z,
// started from 0xFFFFFFFF (a raw register of 0), computes it with the final
// inversion, and then goes on over the tail.
constexpr uint64_t kX96 = 0x0ccaa009eULL;    // fold by 128 bits
constexpr uint64_t kX160 = 0x1751997d0ULL;
constexpr uint64_t kX480 = 0x1c6e41596ULL;   // fold by 512 bits
constexpr uint64_t kX544 = 0x154442bd4ULL;
constexpr uint64_t kX2016 = 0x1322d1430ULL;  // fold by 2048 bits
constexpr uint64_t kX2080 = 0x11542778aULL;

#define SHARDCKPT_PCLMUL __attribute__((target("pclmul,sse2")))
#define SHARDCKPT_VPCLMUL __attribute__((target("avx512f,vpclmulqdq,pclmul,sse2")))

SHARDCKPT_PCLMUL inline __m128i fold128(__m128i x, __m128i k, __m128i next) {
  return _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(x, k, 0x00),
                                     _mm_clmulepi64_si128(x, k, 0x11)),
                       next);
}

SHARDCKPT_PCLMUL inline __m128i load128(const uint8_t* p) {
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
}

// The raw remainder r of everything up to p, then the tail p[0, n), n < 16.
SHARDCKPT_PCLMUL uint32_t finish(__m128i r, const uint8_t* p, size_t n) {
  alignas(16) uint8_t rest[16];
  _mm_store_si128(reinterpret_cast<__m128i*>(rest), r);
  return crc32_zlib(crc32_zlib(0xFFFFFFFFu, rest, 16), p, n);
}

// Fewer bytes than this go to zlib: folding needs 64 after an aligning head
// of up to 15 (measured: folding wins from about 96 bytes on).
constexpr size_t kPclmulMin = 64 + 15;

SHARDCKPT_PCLMUL uint32_t crc32_pclmul(uint32_t crc, const uint8_t* p, size_t n) {
  if (n < kPclmulMin) return crc32_zlib(crc, p, n);
  const size_t head = (16 - (reinterpret_cast<uintptr_t>(p) & 15)) & 15;
  crc = crc32_zlib(crc, p, head);
  p += head;
  n -= head;
  __m128i x0 = _mm_xor_si128(load128(p), _mm_cvtsi32_si128(static_cast<int>(~crc)));
  __m128i x1 = load128(p + 16), x2 = load128(p + 32), x3 = load128(p + 48);
  p += 64;
  n -= 64;
  const __m128i k4 = _mm_set_epi64x(static_cast<long long>(kX480), static_cast<long long>(kX544));
  // Four independent chains hide the multiplier's latency.
  while (n >= 64) {
    x0 = fold128(x0, k4, load128(p));
    x1 = fold128(x1, k4, load128(p + 16));
    x2 = fold128(x2, k4, load128(p + 32));
    x3 = fold128(x3, k4, load128(p + 48));
    p += 64;
    n -= 64;
  }
  const __m128i k1 = _mm_set_epi64x(static_cast<long long>(kX96), static_cast<long long>(kX160));
  __m128i r = fold128(fold128(fold128(x0, k1, x1), k1, x2), k1, x3);
  while (n >= 16) {
    r = fold128(r, k1, load128(p));
    p += 16;
    n -= 16;
  }
  return finish(r, p, n);
}

SHARDCKPT_VPCLMUL inline __m512i fold512(__m512i x, __m512i k, __m512i next) {
  // 0x96: a ^ b ^ c in one instruction.
  return _mm512_ternarylogic_epi64(_mm512_clmulepi64_epi128(x, k, 0x00),
                                   _mm512_clmulepi64_epi128(x, k, 0x11), next, 0x96);
}

SHARDCKPT_VPCLMUL inline __m512i load512(const uint8_t* p) {
  return _mm512_loadu_si512(reinterpret_cast<const void*>(p));
}

SHARDCKPT_VPCLMUL inline __m512i lanes(uint64_t lo, uint64_t hi) {
  const auto l = static_cast<long long>(lo), h = static_cast<long long>(hi);
  return _mm512_set_epi64(h, l, h, l, h, l, h, l);
}

// Below this, the 128-bit path: the wide one needs 256 bytes after an
// aligning head of up to 63, and its merge of 16 lanes costs a dozen multiplies
// (measured: it wins from about 512 bytes on).
constexpr size_t kVpclmulMin = 512;

// The same folding on four 128-bit lanes per register: four registers of
// 64 bytes fold 256 bytes per step (D = 2048), merge into one (D = 512), and
// its lanes merge as in the 128-bit path.
SHARDCKPT_VPCLMUL uint32_t crc32_vpclmul(uint32_t crc, const uint8_t* p, size_t n) {
  if (n < kVpclmulMin) return crc32_pclmul(crc, p, n);
  const size_t head = (64 - (reinterpret_cast<uintptr_t>(p) & 63)) & 63;
  crc = crc32_zlib(crc, p, head);
  p += head;
  n -= head;
  const __m512i init = _mm512_inserti32x4(_mm512_setzero_si512(),
                                          _mm_cvtsi32_si128(static_cast<int>(~crc)), 0);
  __m512i z0 = _mm512_xor_si512(load512(p), init);
  __m512i z1 = load512(p + 64), z2 = load512(p + 128), z3 = load512(p + 192);
  p += 256;
  n -= 256;
  const __m512i k16 = lanes(kX2080, kX2016);
  while (n >= 256) {
    z0 = fold512(z0, k16, load512(p));
    z1 = fold512(z1, k16, load512(p + 64));
    z2 = fold512(z2, k16, load512(p + 128));
    z3 = fold512(z3, k16, load512(p + 192));
    p += 256;
    n -= 256;
  }
  const __m512i k4 = lanes(kX544, kX480);
  __m512i z = fold512(fold512(fold512(z0, k4, z1), k4, z2), k4, z3);
  while (n >= 64) {
    z = fold512(z, k4, load512(p));
    p += 64;
    n -= 64;
  }
  const __m128i k1 = _mm_set_epi64x(static_cast<long long>(kX96), static_cast<long long>(kX160));
  // Through memory, not _mm512_extracti32x4_epi32: GCC 12 warns about the
  // undefined source operand inside that intrinsic.
  alignas(64) uint8_t z_lanes[64];
  _mm512_store_si512(reinterpret_cast<void*>(z_lanes), z);
  __m128i r = fold128(load128(z_lanes), k1, load128(z_lanes + 16));
  r = fold128(r, k1, load128(z_lanes + 32));
  r = fold128(r, k1, load128(z_lanes + 48));
  while (n >= 16) {
    r = fold128(r, k1, load128(p));
    p += 16;
    n -= 16;
  }
  return finish(r, p, n);
}

Crc32Impl detect() {
  __builtin_cpu_init();
  // libgcc's and compiler-rt's avx512f also require the OS to save the zmm state.
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("vpclmulqdq") &&
      __builtin_cpu_supports("pclmul")) {
    return Crc32Impl::kVpclmul;
  }
  if (__builtin_cpu_supports("pclmul")) return Crc32Impl::kPclmul;
  return Crc32Impl::kZlib;
}

#else  // not x86

Crc32Impl detect() { return Crc32Impl::kZlib; }

#endif

}  // namespace

Crc32Impl crc32_best_impl() {
  static const Crc32Impl best = detect();
  return best;
}

bool crc32_impl_available(Crc32Impl impl) {
  return static_cast<int>(impl) <= static_cast<int>(crc32_best_impl());
}

const char* crc32_impl_name(Crc32Impl impl) {
  switch (impl) {
    case Crc32Impl::kPclmul:
      return "pclmul";
    case Crc32Impl::kVpclmul:
      return "vpclmul";
    default:
      return "zlib";
  }
}

bool crc32_impl_from_name(const char* name, Crc32Impl* impl) {
  static const Crc32Impl kAll[] = {Crc32Impl::kZlib, Crc32Impl::kPclmul, Crc32Impl::kVpclmul};
  for (Crc32Impl c : kAll) {
    if (std::strcmp(name, crc32_impl_name(c)) == 0) {
      *impl = c;
      return true;
    }
  }
  return false;
}

uint32_t crc32_update_with(Crc32Impl impl, uint32_t crc, const uint8_t* data, size_t n) {
  if (!crc32_impl_available(impl)) impl = Crc32Impl::kZlib;
#if SHARDCKPT_CRC_X86
  if (impl == Crc32Impl::kVpclmul) return crc32_vpclmul(crc, data, n);
  if (impl == Crc32Impl::kPclmul) return crc32_pclmul(crc, data, n);
#endif
  return crc32_zlib(crc, data, n);
}

uint32_t crc32_update(uint32_t crc, const uint8_t* data, size_t n) {
  return crc32_update_with(crc32_best_impl(), crc, data, n);
}

}  // namespace shardckpt
