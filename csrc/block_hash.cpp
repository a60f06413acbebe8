#include "block_hash.h"

#include <cstring>

// Inlined into this file only: no xxHash symbol leaves it, so another copy of
// xxHash in the process (the Python package's) cannot interpose.
#define XXH_INLINE_ALL
#include "third_party/xxhash/xxhash.h"

#if defined(__x86_64__) || defined(_M_X64)
// xxh_dispatch.c: the widest SIMD variant this CPU has (the inlined one is SSE2 only).
extern "C" XXH128_hash_t XXH3_128bits_dispatch(const void* input, size_t len);
#define SHARDCKPT_XXH3_128 XXH3_128bits_dispatch
#else
#define SHARDCKPT_XXH3_128 XXH3_128bits
#endif

namespace shardckpt {

void block_hash(const uint8_t* raw, size_t n, uint8_t* out) {
  XXH128_canonical_t c;
  XXH128_canonicalFromHash(&c, SHARDCKPT_XXH3_128(raw, n));
  static_assert(sizeof(c.digest) == kHashSize, "XXH128 digests are 16 bytes");
  std::memcpy(out, c.digest, kHashSize);
}

}  // namespace shardckpt
