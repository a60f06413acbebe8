// Block codec core: byte-grouping + zstd + crc32, free of any Python API so
// that it can run on pool threads without the GIL.
//
// docs/FORMAT.md is the contract. Strategy::kZstd writes exactly what the
// Python reference (shardckpt/codec/reference.py) writes; the default,
// kAuto, writes different but equally standard zstd frames, so each path
// decodes the other's blocks bitwise.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace shardckpt {

constexpr char kModeRaw = 'r';
constexpr char kModeZstd = 'z';
constexpr char kModeGrouped = 'g';
// Grouping is only used for 2- and 4-byte floats; the generic path accepts up
// to this many planes so a future dtype does not need a format change here.
constexpr int kMaxGroup = 16;

struct BlockRecord {
  size_t stored_len = 0;
  size_t raw_len = 0;
  uint32_t crc = 0;
  char mode = kModeRaw;
  int group = 1;               // number of planes when mode == 'g'
  char kinds[kMaxGroup] = {};  // 'r' or 'z' per plane
  size_t lens[kMaxGroup] = {};  // stored bytes per plane
};

// Thrown for anything wrong with a stored block (bad record, zstd error, size
// mismatch); the binding turns it into ValueError.
class CodecError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// How a compressible plane becomes a zstd frame.
enum class Strategy {
  kZstd = 0,     // regular zstd frames only: byte-identical to the Python reference
  kAuto = 1,     // per plane, a Huffman-only frame or a regular one (huf_frame.h)
  kHuffman = 2,  // Huffman-only frames for every plane of 2 * sample_size or more (tests)
};

// zlib.crc32(data[0, n)), by crc32_fast.h.
uint32_t crc32(const uint8_t* data, size_t n);

// Encodes raw[0, n) into dst, which must hold at least n bytes: every stored
// form is at most as long as the raw bytes, because a plane that does not
// shrink is stored raw. With `hash`, also writes the block's 16-byte content
// digest there (block_hash.h).
BlockRecord encode_block(const uint8_t* raw, size_t n, int group, bool compress, int level,
                         size_t sample_size, uint8_t* dst, Strategy strategy = Strategy::kAuto,
                         uint8_t* hash = nullptr);

// Checks that a record is self-consistent, with every length checked so that
// no sum can wrap: kinds are known, the raw length divides into the planes, a
// raw plane holds exactly raw_len / group bytes, each plane length fits in
// the stored bytes left before it is added, and the plane lengths add up to
// stored_len exactly. Throws CodecError.
void validate_record(const BlockRecord& rec);

// validate_record, plus the record against the buffers it is applied to:
// stored_len must be the stored buffer's length and raw_len the output's.
void validate_record(const BlockRecord& rec, size_t stored_size, size_t out_size);

// Decodes one block into out[0, out_size). Validates the record against both
// buffer sizes first (it never trusts a length it did not check), requires
// every zstd frame to be exactly one frame that fills its plane and declares
// the expected content size, and never writes past out_size. Does not check
// the crc. Throws CodecError.
void decode_block(const uint8_t* stored, size_t stored_size, const BlockRecord& rec, uint8_t* out,
                  size_t out_size);

std::string zstd_version();

}  // namespace shardckpt
