#include "block_hash.h"

#include <cstring>

// Inlined into this file only: no xxHash symbol leaves it, so another copy of
// xxHash in the process (the Python package's) cannot interpose.
#define XXH_INLINE_ALL
#include "third_party/xxhash/xxhash.h"

namespace shardckpt {

void block_hash(const uint8_t* raw, size_t n, uint8_t* out) {
  XXH128_canonical_t c;
  XXH128_canonicalFromHash(&c, XXH3_128bits(raw, n));
  static_assert(sizeof(c.digest) == kHashSize, "XXH128 digests are 16 bytes");
  std::memcpy(out, c.digest, kHashSize);
}

}  // namespace shardckpt
