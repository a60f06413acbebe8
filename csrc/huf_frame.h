// Huffman-only zstd frames: a standard zstd frame (RFC 8878) whose blocks hold
// Huffman-coded literals and no sequences.
//
// The sign/exponent plane of a float tensor is high-entropy but skewed: it has
// almost no repeated strings for LZ77 to find, so zstd's match finder is pure
// cost there; the Huffman stage alone gets the same ratio at several times the
// speed. Any zstd decoder (ZSTD_decompressDCtx, python-zstandard, `zstd -d`)
// reads these frames: they use only features every decoder must support.
#pragma once

#include <cstddef>
#include <cstdint>

namespace shardckpt {

// One thread's encoder: its Huffman tables and zstd's Huffman workspace, kept
// for the thread's life so that encoding allocates nothing.
class HufFrameEncoder {
 public:
  HufFrameEncoder();
  HufFrameEncoder(const HufFrameEncoder&) = delete;
  HufFrameEncoder& operator=(const HufFrameEncoder&) = delete;

  // Writes one frame holding src[0, n) into dst[0, cap), declaring n as its
  // content size. Returns its length, or 0 if it does not fit in cap (the
  // caller then stores the bytes raw). Blocks that Huffman cannot shrink are
  // stored as raw (or RLE) zstd blocks inside the frame. Throws CodecError on
  // an internal Huffman error.
  size_t encode(const uint8_t* src, size_t n, uint8_t* dst, size_t cap);

 private:
  // Table the decoder will hold after the last Compressed_Literals_Block
  // written (what a Treeless block refers to), and the candidate for the next;
  // 257 = HUF_CTABLE_SIZE_ST(255). The workspace is HUF_WORKSPACE_SIZE (8704)
  // plus slack for zstd's internal alignment; zstd checks the size it is given
  // and a shortfall would fail every frame, not corrupt one.
  alignas(8) size_t tables_[2][257];
  alignas(8) uint8_t wksp_[8704 + 64];
  int flags_ = 0;
};

}  // namespace shardckpt
