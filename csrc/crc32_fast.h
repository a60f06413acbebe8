// CRC-32 (zlib's: reflected, polynomial 0xEDB88320) by carry-less multiply
// folding, chosen at run time: VPCLMULQDQ (AVX-512), PCLMULQDQ, or zlib.
//
// Every result equals zlib's crc32_z(crc, data, n), which stays the fallback
// for short inputs, the bytes before the first aligned load and after the
// last 16-byte chunk, and for CPUs without carry-less multiply.
#pragma once

#include <cstddef>
#include <cstdint>

namespace shardckpt {

enum class Crc32Impl { kZlib = 0, kPclmul = 1, kVpclmul = 2 };

// crc32_z(crc, data, n) with the fastest implementation this CPU runs.
uint32_t crc32_update(uint32_t crc, const uint8_t* data, size_t n);

// The implementation crc32_update uses on this CPU.
Crc32Impl crc32_best_impl();

bool crc32_impl_available(Crc32Impl impl);

// "zlib", "pclmul" or "vpclmul".
const char* crc32_impl_name(Crc32Impl impl);

// The inverse of crc32_impl_name; false for an unknown name.
bool crc32_impl_from_name(const char* name, Crc32Impl* impl);

// crc32_update with a given implementation, so that tests can check each one
// on a CPU that has them all; an unavailable one falls back to zlib.
uint32_t crc32_update_with(Crc32Impl impl, uint32_t crc, const uint8_t* data, size_t n);

}  // namespace shardckpt
