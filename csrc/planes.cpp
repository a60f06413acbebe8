#include "planes.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace shardckpt {

// Plane k holds byte (group-1-k) of every element: the sign/exponent byte of
// a little-endian float comes first. The 2- and 4-byte cases make one pass
// over the input that feeds all planes; on x86-64 they use SSE2 (always
// present there), which is ~7x faster than the byte loop the compiler emits
// for strided byte access. Byte positions are memory order, so the result
// does not depend on the host's endianness.
void split_planes(const uint8_t* src, size_t m, int group, uint8_t* planes) {
  size_t i = 0;
  if (group == 4) {
    uint8_t* p0 = planes;
    uint8_t* p1 = planes + m;
    uint8_t* p2 = planes + 2 * m;
    uint8_t* p3 = planes + 3 * m;
#if defined(__SSE2__)
    const __m128i lo = _mm_set1_epi32(0xFF);
    for (; i + 16 <= m; i += 16) {
      __m128i v[4];
      for (int j = 0; j < 4; ++j) {
        v[j] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 4 * i + 16 * j));
      }
      // Isolate byte `shift/8` of each 32-bit lane, then narrow 32 -> 16 -> 8
      // bits; the lanes hold 0..255, so the saturating packs are exact.
      auto plane = [&](int shift) {
        const __m128i xmm_shift = _mm_cvtsi32_si128(shift);
        __m128i a = _mm_and_si128(_mm_srl_epi32(v[0], xmm_shift), lo);
        __m128i b = _mm_and_si128(_mm_srl_epi32(v[1], xmm_shift), lo);
        __m128i c = _mm_and_si128(_mm_srl_epi32(v[2], xmm_shift), lo);
        __m128i d = _mm_and_si128(_mm_srl_epi32(v[3], xmm_shift), lo);
        return _mm_packus_epi16(_mm_packs_epi32(a, b), _mm_packs_epi32(c, d));
      };
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p0 + i), plane(24));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p1 + i), plane(16));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p2 + i), plane(8));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p3 + i), plane(0));
    }
#endif
    for (; i < m; ++i) {
      const uint8_t* e = src + 4 * i;
      p0[i] = e[3];
      p1[i] = e[2];
      p2[i] = e[1];
      p3[i] = e[0];
    }
  } else if (group == 2) {
    uint8_t* p0 = planes;
    uint8_t* p1 = planes + m;
#if defined(__SSE2__)
    const __m128i lo = _mm_set1_epi16(0xFF);
    for (; i + 16 <= m; i += 16) {
      const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 2 * i));
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 2 * i + 16));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p0 + i),
                       _mm_packus_epi16(_mm_srli_epi16(a, 8), _mm_srli_epi16(b, 8)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p1 + i),
                       _mm_packus_epi16(_mm_and_si128(a, lo), _mm_and_si128(b, lo)));
    }
#endif
    for (; i < m; ++i) {
      p0[i] = src[2 * i + 1];
      p1[i] = src[2 * i];
    }
  } else {
    for (int k = 0; k < group; ++k) {
      uint8_t* p = planes + static_cast<size_t>(k) * m;
      const uint8_t* s = src + (group - 1 - k);
      for (size_t j = 0; j < m; ++j) p[j] = s[j * group];
    }
  }
}

void merge_planes(const uint8_t* const* planes, size_t m, int group, uint8_t* out) {
  size_t i = 0;
  if (group == 4) {
    const uint8_t* p0 = planes[0];
    const uint8_t* p1 = planes[1];
    const uint8_t* p2 = planes[2];
    const uint8_t* p3 = planes[3];
#if defined(__SSE2__)
    for (; i + 16 <= m; i += 16) {
      const __m128i a0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p0 + i));
      const __m128i a1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p1 + i));
      const __m128i a2 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p2 + i));
      const __m128i a3 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p3 + i));
      // (byte0, byte1) pairs from planes 3 and 2, (byte2, byte3) from 1 and 0.
      const __m128i l01 = _mm_unpacklo_epi8(a3, a2);
      const __m128i h01 = _mm_unpackhi_epi8(a3, a2);
      const __m128i l23 = _mm_unpacklo_epi8(a1, a0);
      const __m128i h23 = _mm_unpackhi_epi8(a1, a0);
      uint8_t* o = out + 4 * i;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o), _mm_unpacklo_epi16(l01, l23));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 16), _mm_unpackhi_epi16(l01, l23));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 32), _mm_unpacklo_epi16(h01, h23));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 48), _mm_unpackhi_epi16(h01, h23));
    }
#endif
    for (; i < m; ++i) {
      uint8_t* e = out + 4 * i;
      e[0] = p3[i];
      e[1] = p2[i];
      e[2] = p1[i];
      e[3] = p0[i];
    }
  } else if (group == 2) {
    const uint8_t* p0 = planes[0];
    const uint8_t* p1 = planes[1];
#if defined(__SSE2__)
    for (; i + 16 <= m; i += 16) {
      const __m128i a0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p0 + i));
      const __m128i a1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p1 + i));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2 * i), _mm_unpacklo_epi8(a1, a0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2 * i + 16), _mm_unpackhi_epi8(a1, a0));
    }
#endif
    for (; i < m; ++i) {
      out[2 * i] = p1[i];
      out[2 * i + 1] = p0[i];
    }
  } else {
    for (int k = 0; k < group; ++k) {
      const uint8_t* p = planes[k];
      uint8_t* d = out + (group - 1 - k);
      for (size_t j = 0; j < m; ++j) d[j * group] = p[j];
    }
  }
}

}  // namespace shardckpt
