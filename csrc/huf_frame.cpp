#include "huf_frame.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <utility>

#include "codec.h"
#include "third_party/zstd/zstd.h"

// The Huffman coder of the vendored zstd amalgamation (third_party/zstd/zstd.c,
// 1.5.7, lib/common/huf.h). Its symbols are hidden inside our .so, which is
// fine: this file is linked into the same module. The declarations must match
// huf.h exactly; test_codec_huffman.py decodes every frame with the separate
// zstd of python-zstandard, so a mismatch cannot go unnoticed.
extern "C" {
typedef size_t HUF_CElt;
typedef enum { HUF_repeat_none, HUF_repeat_check, HUF_repeat_valid } HUF_repeat;
size_t HUF_compress4X_repeat(void* dst, size_t dstSize, const void* src, size_t srcSize,
                             unsigned maxSymbolValue, unsigned tableLog, void* workSpace,
                             size_t wkspSize, HUF_CElt* hufTable, HUF_repeat* repeat, int flags);
unsigned HUF_isError(size_t code);
const char* HUF_getErrorName(size_t code);
}

namespace shardckpt {
namespace {

constexpr size_t kBlockMax = 128 << 10;  // ZSTD_BLOCKSIZE_MAX
constexpr unsigned kTableLog = 11;       // HUF_TABLELOG_DEFAULT, what zstd uses for literals
constexpr int kHufFlagBmi2 = 1;          // HUF_flags_bmi2
// Below this a block is stored raw: 4-stream Huffman needs a few bytes per
// stream (zstd refuses 4 streams under 6 literals) and the table header alone
// costs tens of bytes.
constexpr size_t kMinHufBlock = 256;

constexpr uint8_t kBlockRaw = 0, kBlockRle = 1, kBlockCompressed = 2;
constexpr uint8_t kLitCompressed = 2, kLitTreeless = 3;

void put_le(uint8_t* p, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}

void block_header(uint8_t* p, bool last, uint8_t type, size_t size) {
  put_le(p, (static_cast<uint64_t>(size) << 3) | (static_cast<uint64_t>(type) << 1) | last, 3);
}

}  // namespace

HufFrameEncoder::HufFrameEncoder() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  // zstd's amalgamation is built with runtime BMI2 dispatch on x86-64; the
  // flag picks the BMI2 bit-writer when the CPU has it.
  if (__builtin_cpu_supports("bmi2")) flags_ |= kHufFlagBmi2;
#endif
}

size_t HufFrameEncoder::encode(const uint8_t* src, size_t n, uint8_t* dst, size_t cap) {
  // Frame header: magic, descriptor, window descriptor, content size.
  // Frame_Header_Descriptor: FCS_Flag 2 (4-byte size) or 3 (8-byte size),
  // Single_Segment 0, no checksum, no dictionary. A 128 KiB window
  // (Exponent 7, Mantissa 0) is all a frame without sequences needs, so
  // streaming decoders allocate little however large the plane.
  const bool big = n > 0xFFFFFFFFu;
  const size_t header = 6 + (big ? 8 : 4);
  if (cap < header) return 0;
  put_le(dst, 0xFD2FB528u, 4);
  dst[4] = static_cast<uint8_t>((big ? 3 : 2) << 6);
  dst[5] = 7 << 3;
  put_le(dst + 6, n, big ? 8 : 4);
  size_t op = header;

  HUF_CElt* prev = tables_[0];  // valid once `have_prev`
  HUF_CElt* next = tables_[1];
  bool have_prev = false;
  size_t ip = 0;
  do {
    const size_t len = std::min(kBlockMax, n - ip);
    const bool last = ip + len == n;
    const uint8_t* in = src + ip;
    if (cap - op < 3) return 0;
    uint8_t* bh = dst + op;
    op += 3;
    // Block content: 5-byte literals header (4 streams, 18-bit sizes), the
    // Huffman payload, then Number_of_Sequences = 0.
    size_t h = 0;
    HUF_repeat repeat = HUF_repeat_none;
    if (len >= kMinHufBlock && cap - op > 6) {
      if (have_prev) {
        // A reused table must be the one the decoder holds: start from it.
        std::memcpy(next, prev, sizeof(tables_[0]));
        repeat = HUF_repeat_check;
      }
      // Room for the payload only if it beats a raw block.
      const size_t room = std::min(cap - op - 6, len - 7);
      h = HUF_compress4X_repeat(dst + op + 5, room, in, len, 255, kTableLog, wksp_, sizeof(wksp_),
                                next, &repeat, flags_);
      if (HUF_isError(h)) {
        // dstSize_tooSmall only means "does not shrink enough".
        if (ZSTD_getErrorCode(h) != ZSTD_error_dstSize_tooSmall) {
          throw CodecError(std::string("huffman: ") + HUF_getErrorName(h));
        }
        h = 0;
      }
    }
    if (h == 1) {  // one symbol repeated: an RLE block
      if (cap - op < 1) return 0;
      const uint8_t sym = in[0];
      block_header(bh, last, kBlockRle, len);
      dst[op++] = sym;
    } else if (h >= 2 && 5 + h + 1 < len) {
      // HUF leaves `repeat` alone when it reused the table it was given and
      // resets it when it wrote (and stored into `next`) a new one.
      const bool fresh = !have_prev || repeat == HUF_repeat_none;
      const uint8_t lit = fresh ? kLitCompressed : kLitTreeless;
      const uint64_t lh = lit | (3u << 2) | (static_cast<uint64_t>(len) << 4) |
                          (static_cast<uint64_t>(h) << 22);
      put_le(dst + op, lh, 5);
      op += 5 + h;
      dst[op++] = 0;
      block_header(bh, last, kBlockCompressed, 5 + h + 1);
      if (fresh) {
        std::swap(prev, next);
        have_prev = true;
      }
    } else {
      if (cap - op < len) return 0;
      std::memcpy(dst + op, in, len);
      op += len;
      block_header(bh, last, kBlockRaw, len);
    }
    ip += len;
  } while (ip < n);
  return op;
}

}  // namespace shardckpt
