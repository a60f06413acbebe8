// Byte planes of a block: plane k holds byte (group-1-k) of every element.
#pragma once

#include <cstddef>
#include <cstdint>

namespace shardckpt {

// Splits m elements of `group` bytes at src into planes[0, m * group): plane
// k at planes + k * m.
void split_planes(const uint8_t* src, size_t m, int group, uint8_t* planes);

// The inverse: interleaves planes[k][0, m) into out[0, m * group).
void merge_planes(const uint8_t* const* planes, size_t m, int group, uint8_t* out);

}  // namespace shardckpt
