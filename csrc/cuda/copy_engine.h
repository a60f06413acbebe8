// GPU -> host snapshot copies on the plain CUDA runtime API, free of any
// Python API so that everything here runs with the GIL released.
//
// Device pointers and stream handles arrive as integers from Python
// (tensor.data_ptr(), torch.cuda.current_stream().cuda_stream): the extension
// never needs torch's C++ headers or its ABI.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace shardckpt_cuda {

// Any failed CUDA runtime call; `code` is the cudaError_t value.
class CudaError : public std::runtime_error {
 public:
  CudaError(const std::string& what, int code) : std::runtime_error(what), code(code) {}
  int code;
};

// Page-locked host memory from cudaHostAlloc (portable: usable from every
// device's streams). Allocation costs ~0.7 s per GiB, so the caller keeps one
// and reuses it across saves.
class PinnedBuffer {
 public:
  explicit PinnedBuffer(size_t nbytes);
  ~PinnedBuffer();
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

// One contiguous device range to copy. `dst` is either inside the pinned
// buffer (direct: one cudaMemcpyAsync straight into it) or pageable host
// memory (streamed: through the pinned ring, chunk by chunk).
struct Segment {
  int device = 0;
  uintptr_t src = 0;
  size_t nbytes = 0;
  uint8_t* dst = nullptr;
  bool direct = true;
};

// The stream whose pending work the snapshot is ordered after, per device.
struct StreamRef {
  int device = 0;
  uintptr_t stream = 0;  // 0 is the legacy default stream
};

struct SnapshotStats {
  double enqueue_s = 0;   // issuing the direct copies
  double stream_s = 0;    // the streamed part: copies through the ring + host drain
  double wait_s = 0;      // waiting for the last copy to land
  size_t direct_bytes = 0;
  size_t streamed_bytes = 0;
  size_t chunks = 0;      // ring chunks
};

// Copies every segment to the host and returns once all bytes have landed.
//
// For each device an event is recorded on its `after` stream and the device's
// dedicated copy stream waits on it: the copies see everything queued before
// the call and nothing queued after, without a device-wide synchronize, and
// the training stream itself never waits. Direct segments are issued first
// (they need no CPU); streamed ones then go through `ring` in chunks of
// `slot_bytes`: while the host drains chunk k into its pageable destination
// (split over `threads` threads) the copy engine already moves chunks
// k+1 .. k+slots-1. The current device is restored on return.
SnapshotStats snapshot(const std::vector<Segment>& segments, const std::vector<StreamRef>& after,
                       uint8_t* ring, size_t ring_bytes, size_t slot_bytes, int threads);

// 0 when there is no driver or no device (never throws).
int device_count();
// cudaGetDeviceCount's error text when device_count() is 0, else "".
std::string device_problem();
int runtime_version();

// Process-wide counters: pinned bytes held now, cudaHostAlloc calls ever made,
// copy streams created (one per device, kept for the process lifetime).
size_t pinned_bytes_held();
size_t pinned_allocations();
size_t copy_streams();

}  // namespace shardckpt_cuda
