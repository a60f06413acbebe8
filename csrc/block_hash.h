// Content digests of raw blocks: XXH3-128 (xxHash 0.8, vendored in
// third_party/xxhash/), the same digest as xxhash.xxh3_128_digest() of the
// Python package. Not a checksum of the format (that is the crc32 of the
// stored bytes): it names a block's raw content, e.g. to skip rewriting an
// unchanged block.
#pragma once

#include <cstddef>
#include <cstdint>

namespace shardckpt {

constexpr size_t kHashSize = 16;

// Writes XXH128's canonical (big-endian) form of raw[0, n) to out[0, 16).
void block_hash(const uint8_t* raw, size_t n, uint8_t* out);

}  // namespace shardckpt
