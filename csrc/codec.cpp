#include "codec.h"

#include <algorithm>
#include <climits>
#include <cstring>
#include <vector>

#include "block_hash.h"
#include "crc32_fast.h"
#include "huf_frame.h"
#include "planes.h"
#include "third_party/zstd/zstd.h"

namespace shardckpt {
namespace {

// Per-thread zstd contexts and scratch memory. Contexts are expensive to
// create (hundreds of KiB of tables), so each thread keeps one of each for its
// whole life; the scratch buffers only grow, so steady-state encoding of
// equal-sized blocks allocates nothing.
class Workspace {
 public:
  Workspace() = default;
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  ~Workspace() {
    ZSTD_freeCCtx(cctx_);
    ZSTD_freeDCtx(dctx_);
  }

  // Compresses exactly like zstandard.ZstdCompressor(level=L).compress(): a
  // single ZSTD_compressStream2(ZSTD_e_end) call with the source size pledged
  // and an output buffer of ZSTD_compressBound. Any other entry point (e.g.
  // ZSTD_compressCCtx, or a smaller output buffer that makes zstd stage
  // through its internal buffer) risks different frames, and the format
  // promises byte-identical blocks from both codec paths.
  size_t compress(const uint8_t* src, size_t n, int level) {
    if (cctx_ == nullptr) {
      cctx_ = ZSTD_createCCtx();
      if (cctx_ == nullptr) throw std::bad_alloc();
    }
    ZSTD_CCtx_reset(cctx_, ZSTD_reset_session_only);
    if (level != level_) {
      check(ZSTD_CCtx_setParameter(cctx_, ZSTD_c_compressionLevel, level), "set level");
      level_ = level;
    }
    check(ZSTD_CCtx_setPledgedSrcSize(cctx_, n), "pledge size");
    const size_t bound = ZSTD_compressBound(n);
    if (zbuf_.size() < bound) zbuf_.resize(bound);
    ZSTD_inBuffer in{src, n, 0};
    ZSTD_outBuffer out{zbuf_.data(), bound, 0};
    const size_t left = ZSTD_compressStream2(cctx_, &out, &in, ZSTD_e_end);
    check(left, "compress");
    if (left != 0) throw CodecError("zstd: partial frame flush");
    return out.pos;
  }

  const uint8_t* compressed() const { return zbuf_.data(); }

  ZSTD_DCtx* dctx() {
    if (dctx_ == nullptr) {
      dctx_ = ZSTD_createDCtx();
      if (dctx_ == nullptr) throw std::bad_alloc();
    }
    return dctx_;
  }

  uint8_t* planes(size_t n) {
    if (planes_.size() < n) planes_.resize(n);
    return planes_.data();
  }

  HufFrameEncoder& huf() { return huf_; }

  // Room for a sample's Huffman frame (never read back).
  uint8_t* sample_buf(size_t n) {
    if (sample_.size() < n) sample_.resize(n);
    return sample_.data();
  }

 private:
  static void check(size_t r, const char* what) {
    if (ZSTD_isError(r)) throw CodecError(std::string("zstd ") + what + ": " + ZSTD_getErrorName(r));
  }

  ZSTD_CCtx* cctx_ = nullptr;
  ZSTD_DCtx* dctx_ = nullptr;
  int level_ = INT_MIN;
  std::vector<uint8_t> zbuf_;
  std::vector<uint8_t> planes_;
  std::vector<uint8_t> sample_;
  HufFrameEncoder huf_;
};

Workspace& workspace() {
  thread_local Workspace ws;
  return ws;
}

size_t store_raw(const uint8_t* src, size_t n, uint8_t* dst, char* kind) {
  std::memcpy(dst, src, n);
  *kind = kModeRaw;
  return n;
}

// The legacy choice, byte for byte what the Python reference (_encode_plane)
// writes: raw if a sample barely shrinks or zstd does not shrink the whole,
// else one regular zstd frame.
size_t encode_plane_zstd(Workspace& ws, const uint8_t* src, size_t n, int level,
                         size_t sample_size, uint8_t* dst, char* kind) {
  // A plane whose sample barely shrinks is noise (low mantissa bytes):
  // compressing all of it would burn CPU for nothing.
  if (n >= 2 * sample_size) {
    const size_t s = ws.compress(src, sample_size, level);
    if (s * 20 > sample_size * 19) return store_raw(src, n, dst, kind);
  }
  const size_t z = ws.compress(src, n, level);
  if (z >= n) return store_raw(src, n, dst, kind);
  std::memcpy(dst, ws.compressed(), z);
  *kind = kModeZstd;
  return z;
}

// Raw, a Huffman-only frame or a regular zstd frame, from one sample coded
// both ways. zstd's literals are Huffman-coded with the same tables, so on the
// sample zstd can only beat Huffman by the matches it finds; when they are
// worth less than 10 % (the usual case for exponent bytes, which are skewed
// but hardly repeat), the Huffman-only frame gives about the same ratio at
// several times the speed. Matches win on runs (zeros of untouched embedding
// rows in Adam moments), and so does any byte that fills over half the
// sample: Huffman spends at least a bit on every byte, zstd nothing in a run.
// The sample is pieces spread over the whole plane, not its head: a tensor
// whose first rows differ from the rest would otherwise be misjudged.
size_t encode_plane_auto(Workspace& ws, const uint8_t* src, size_t n, int level,
                         size_t sample_size, uint8_t* dst, char* kind, bool force_huf) {
  constexpr size_t kPieces = 16;
  if (n < 2 * sample_size || sample_size < kPieces) {
    return encode_plane_zstd(ws, src, n, level, sample_size, dst, kind);
  }
  bool huf = force_huf;
  if (!huf) {
    uint8_t* sample = ws.sample_buf(2 * sample_size);
    const size_t piece = sample_size / kPieces;
    const size_t len = piece * kPieces;
    for (size_t j = 0; j < kPieces; ++j) {
      std::memcpy(sample + j * piece, src + j * ((n - piece) / (kPieces - 1)), piece);
    }
    uint32_t count[256] = {};
    for (size_t i = 0; i < len; ++i) ++count[sample[i]];
    const size_t top = *std::max_element(count, count + 256);
    const size_t z = ws.compress(sample, len, level);
    size_t h = ws.huf().encode(sample, len, sample + sample_size, len);
    if (h == 0) h = len;
    if (std::min(z, h) * 20 > len * 19) return store_raw(src, n, dst, kind);
    huf = z * 10 >= h * 9 && top * 2 <= len;
  }
  if (huf) {
    // Anything not shorter than the plane is no better than raw.
    const size_t len = ws.huf().encode(src, n, dst, n - 1);
    if (len == 0) return store_raw(src, n, dst, kind);
    *kind = kModeZstd;
    return len;
  }
  const size_t z = ws.compress(src, n, level);
  if (z >= n) return store_raw(src, n, dst, kind);
  std::memcpy(dst, ws.compressed(), z);
  *kind = kModeZstd;
  return z;
}

size_t encode_plane(Workspace& ws, const uint8_t* src, size_t n, int level, size_t sample_size,
                    uint8_t* dst, char* kind, Strategy strategy) {
  if (strategy == Strategy::kZstd) {
    return encode_plane_zstd(ws, src, n, level, sample_size, dst, kind);
  }
  return encode_plane_auto(ws, src, n, level, sample_size, dst, kind,
                           strategy == Strategy::kHuffman);
}

}  // namespace

uint32_t crc32(const uint8_t* data, size_t n) { return crc32_update(0, data, n); }

BlockRecord encode_block(const uint8_t* raw, size_t n, int group, bool compress, int level,
                         size_t sample_size, uint8_t* dst, Strategy strategy, uint8_t* hash) {
  if (group < 1 || group > kMaxGroup) throw CodecError("group must be in 1..16");
  // Hashed first, on this thread: the bytes are then in cache for the split.
  if (hash != nullptr) block_hash(raw, n, hash);
  BlockRecord rec;
  rec.raw_len = n;
  if (!compress || n == 0) {
    if (n) std::memcpy(dst, raw, n);
    rec.stored_len = n;
    rec.mode = kModeRaw;
  } else if (group == 1) {
    char kind = kModeRaw;
    rec.stored_len = encode_plane(workspace(), raw, n, level, sample_size, dst, &kind, strategy);
    rec.mode = kind;
  } else {
    if (n % static_cast<size_t>(group) != 0) {
      throw CodecError("block of " + std::to_string(n) + " bytes is not a whole number of " +
                       std::to_string(group) + "-byte elements");
    }
    Workspace& ws = workspace();
    const size_t m = n / group;
    uint8_t* planes = ws.planes(n);
    split_planes(raw, m, group, planes);
    size_t off = 0;
    for (int k = 0; k < group; ++k) {
      const size_t len = encode_plane(ws, planes + k * m, m, level, sample_size, dst + off,
                                      &rec.kinds[k], strategy);
      rec.lens[k] = len;
      off += len;
    }
    rec.stored_len = off;
    rec.mode = kModeGrouped;
    rec.group = group;
  }
  rec.crc = crc32(dst, rec.stored_len);
  return rec;
}

namespace {

// A mode or plane kind for an error message: the letter if printable ASCII,
// else \xNN, so a message is always valid UTF-8.
std::string show(char c) {
  const auto u = static_cast<unsigned char>(c);
  if (u >= 0x20 && u < 0x7F) return std::string("'") + c + "'";
  static const char* hex = "0123456789abcdef";
  return std::string("'\\x") + hex[u >> 4] + hex[u & 15] + "'";
}

}  // namespace

void validate_record(const BlockRecord& rec) {
  switch (rec.mode) {
    case kModeRaw:
      if (rec.stored_len != rec.raw_len) throw CodecError("raw block with stored != raw length");
      return;
    case kModeZstd:
      // Even an empty input makes a frame of a dozen bytes.
      if (rec.stored_len == 0) throw CodecError("empty zstd frame");
      return;
    case kModeGrouped: {
      if (rec.group < 1 || rec.group > kMaxGroup) throw CodecError("bad plane count");
      const size_t group = static_cast<size_t>(rec.group);
      if (rec.raw_len % group != 0) throw CodecError("raw length is not a multiple of planes");
      const size_t m = rec.raw_len / group;
      // `left` is what the planes not yet seen may still use; comparing
      // before subtracting means no length, however large, can wrap a sum.
      size_t left = rec.stored_len;
      for (int k = 0; k < rec.group; ++k) {
        const size_t len = rec.lens[k];
        if (rec.kinds[k] == kModeRaw) {
          if (len != m) throw CodecError("raw plane of the wrong length");
        } else if (rec.kinds[k] == kModeZstd) {
          if (len == 0) throw CodecError("empty zstd plane");
        } else {
          throw CodecError("unknown plane kind " + show(rec.kinds[k]));
        }
        if (len > left) throw CodecError("plane lengths do not add up to the block");
        left -= len;
      }
      if (left != 0) throw CodecError("plane lengths do not add up to the block");
      return;
    }
    default:
      throw CodecError("unknown block mode " + show(rec.mode));
  }
}

void validate_record(const BlockRecord& rec, size_t stored_size, size_t out_size) {
  if (rec.stored_len != stored_size) {
    throw CodecError("stored block is " + std::to_string(stored_size) + " bytes, record says " +
                     std::to_string(rec.stored_len));
  }
  if (rec.raw_len != out_size) {
    throw CodecError("output buffer is " + std::to_string(out_size) + " bytes, block holds " +
                     std::to_string(rec.raw_len));
  }
  validate_record(rec);
}

namespace {

// Decodes src[0, len), which must be exactly one zstd frame declaring `cap`
// bytes of content, into dst[0, cap). The declared size is checked before
// anything is decoded, trailing bytes and further frames are refused, and
// zstd is never given more than `cap` bytes of room.
void unzstd(ZSTD_DCtx* dctx, uint8_t* dst, size_t cap, const uint8_t* src, size_t len) {
  const size_t frame = ZSTD_findFrameCompressedSize(src, len);
  if (ZSTD_isError(frame)) throw CodecError(std::string("zstd: ") + ZSTD_getErrorName(frame));
  if (frame != len) {
    throw CodecError("zstd frame is " + std::to_string(frame) + " of " + std::to_string(len) +
                     " stored bytes");
  }
  const unsigned long long declared = ZSTD_getFrameContentSize(src, len);
  if (declared == ZSTD_CONTENTSIZE_ERROR) throw CodecError("zstd: bad frame header");
  if (declared == ZSTD_CONTENTSIZE_UNKNOWN) throw CodecError("zstd frame does not declare its size");
  if (declared != cap) {
    throw CodecError("zstd frame declares " + std::to_string(declared) + " bytes, expected " +
                     std::to_string(cap));
  }
  const size_t r = ZSTD_decompressDCtx(dctx, dst, cap, src, len);
  if (ZSTD_isError(r)) throw CodecError(std::string("zstd: ") + ZSTD_getErrorName(r));
  if (r != cap) {
    throw CodecError("zstd frame holds " + std::to_string(r) + " bytes, expected " +
                     std::to_string(cap));
  }
}

}  // namespace

void decode_block(const uint8_t* stored, size_t stored_size, const BlockRecord& rec, uint8_t* out,
                  size_t out_size) {
  validate_record(rec, stored_size, out_size);
  const size_t n = rec.raw_len;
  if (rec.mode == kModeRaw) {
    if (n) std::memcpy(out, stored, n);
    return;
  }
  Workspace& ws = workspace();
  if (rec.mode == kModeZstd) {
    unzstd(ws.dctx(), out, n, stored, rec.stored_len);
    return;
  }
  // Compressed planes decompress straight into per-thread scratch and raw
  // planes are read in place, so the merge is the only pass that touches out.
  const int group = rec.group;
  const size_t m = n / group;
  uint8_t* scratch = ws.planes(n);
  const uint8_t* planes[kMaxGroup];
  size_t off = 0;
  for (int k = 0; k < group; ++k) {
    if (rec.kinds[k] == kModeZstd) {
      unzstd(ws.dctx(), scratch + k * m, m, stored + off, rec.lens[k]);
      planes[k] = scratch + k * m;
    } else {
      planes[k] = stored + off;
    }
    off += rec.lens[k];  // validated: off + lens[k] <= stored_len, no wrap
  }
  merge_planes(planes, m, group, out);
}

std::string zstd_version() { return ZSTD_versionString(); }

}  // namespace shardckpt
