// The snapshot copy engine: see copy_engine.h for the contract.
#include "copy_engine.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>

namespace shardckpt_cuda {
namespace {

std::atomic<size_t> g_pinned_held{0};
std::atomic<size_t> g_pinned_allocs{0};
std::mutex g_streams_mu;
// (device, role) -> stream. Role 0 carries direct copies, role 1 the ring:
// on separate streams the ring's chunks are not queued behind gigabytes of
// direct copies, so the host drain overlaps them.
std::map<std::pair<int, int>, cudaStream_t> g_streams;

[[noreturn]] void fail(cudaError_t e, const std::string& what) {
  cudaGetLastError();  // clear a non-sticky error so later calls start clean
  throw CudaError(what + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")",
                  static_cast<int>(e));
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) fail(e, what);
}

double since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// torch keeps its notion of the current device in the same driver state we
// change, so every entry point puts it back.
class DeviceGuard {
 public:
  DeviceGuard() {
    if (cudaGetDevice(&prev_) != cudaSuccess) {
      cudaGetLastError();
      prev_ = -1;
    }
  }
  ~DeviceGuard() {
    if (prev_ >= 0) cudaSetDevice(prev_);
  }
  void set(int device) {
    if (device != cur_) {
      check(cudaSetDevice(device), "cudaSetDevice");
      cur_ = device;
    }
  }

 private:
  int prev_ = -1;
  int cur_ = -1;
};

struct Event {
  cudaEvent_t e = nullptr;
  Event() { check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreate"); }
  ~Event() {
    if (e != nullptr) cudaEventDestroy(e);  // released by the driver once it completes
  }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
};

// The caller has made `device` current.
cudaStream_t copy_stream(int device, int role) {
  std::lock_guard<std::mutex> lock(g_streams_mu);
  auto key = std::make_pair(device, role);
  auto it = g_streams.find(key);
  if (it != g_streams.end()) return it->second;
  cudaStream_t s = nullptr;
  // Non-blocking: the legacy default stream must not serialise with it.
  check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
  g_streams[key] = s;
  return s;
}

// Pageable destinations are written by the CPU; one thread moves ~10 GB/s,
// well under what the copy engine delivers, so big chunks are split.
void drain(uint8_t* dst, const uint8_t* src, size_t n, int threads) {
  constexpr size_t kMinPart = 4 << 20;
  int parts = static_cast<int>(std::min<size_t>(std::max(threads, 1), n / kMinPart + 1));
  if (parts <= 1) {
    std::memcpy(dst, src, n);
    return;
  }
  size_t part = (n + parts - 1) / parts;
  std::vector<std::thread> pool;
  pool.reserve(parts - 1);
  for (int i = 1; i < parts; ++i) {
    size_t off = part * i;
    if (off >= n) break;
    size_t len = std::min(part, n - off);
    pool.emplace_back([=] { std::memcpy(dst + off, src + off, len); });
  }
  std::memcpy(dst, src, std::min(part, n));
  for (auto& t : pool) t.join();
}

struct Chunk {
  int device;
  uintptr_t src;
  uint8_t* dst;
  size_t n;
};

}  // namespace

PinnedBuffer::PinnedBuffer(size_t nbytes) : size_(nbytes) {
  if (nbytes == 0) throw std::invalid_argument("a pinned buffer needs at least one byte");
  void* p = nullptr;
  // Portable: the memory is pinned for every device's context, so one pool
  // serves a process that copies from several GPUs.
  cudaError_t e = cudaHostAlloc(&p, nbytes, cudaHostAllocPortable);
  if (e != cudaSuccess) fail(e, "cudaHostAlloc of " + std::to_string(nbytes) + " bytes");
  data_ = static_cast<uint8_t*>(p);
  g_pinned_held += nbytes;
  g_pinned_allocs += 1;
}

PinnedBuffer::~PinnedBuffer() {
  if (data_ != nullptr) {
    // At interpreter exit the runtime may already be unloading; the OS takes
    // the memory back then anyway.
    if (cudaFreeHost(data_) != cudaSuccess) cudaGetLastError();
    g_pinned_held -= size_;
  }
}

SnapshotStats snapshot(const std::vector<Segment>& segments, const std::vector<StreamRef>& after,
                       uint8_t* ring, size_t ring_bytes, size_t slot_bytes, int threads) {
  SnapshotStats st;
  if (segments.empty()) return st;
  DeviceGuard guard;
  std::map<int, cudaStream_t> direct_streams, ring_streams;
  std::vector<Chunk> chunks;
  for (const Segment& s : segments) {
    if (s.nbytes == 0) continue;
    guard.set(s.device);
    if (!direct_streams.count(s.device)) {
      direct_streams[s.device] = copy_stream(s.device, 0);
      ring_streams[s.device] = copy_stream(s.device, 1);
    }
    if (s.direct) {
      st.direct_bytes += s.nbytes;
    } else {
      if (slot_bytes == 0 || ring == nullptr || ring_bytes < slot_bytes)
        throw std::invalid_argument("streamed segments need a ring of at least one slot");
      st.streamed_bytes += s.nbytes;
      for (size_t off = 0; off < s.nbytes; off += slot_bytes)
        chunks.push_back({s.device, s.src + off, s.dst + off, std::min(slot_bytes, s.nbytes - off)});
    }
  }
  st.chunks = chunks.size();
  try {
    auto t0 = std::chrono::steady_clock::now();
    // The snapshot point: each device's copy streams start after what its
    // `after` stream has queued so far, and nothing queued later.
    for (auto& [device, ds] : direct_streams) {
      cudaStream_t training = cudaStreamLegacy;
      for (const StreamRef& r : after)
        if (r.device == device) training = reinterpret_cast<cudaStream_t>(r.stream);
      guard.set(device);
      Event point;
      check(cudaEventRecord(point.e, training), "cudaEventRecord on the training stream");
      check(cudaStreamWaitEvent(ds, point.e, 0), "cudaStreamWaitEvent (direct copies)");
      check(cudaStreamWaitEvent(ring_streams[device], point.e, 0),
            "cudaStreamWaitEvent (ring copies)");
    }
    for (const Segment& s : segments) {
      if (!s.direct || s.nbytes == 0) continue;
      guard.set(s.device);
      check(cudaMemcpyAsync(s.dst, reinterpret_cast<const void*>(s.src), s.nbytes,
                            cudaMemcpyDeviceToHost, direct_streams[s.device]),
            "cudaMemcpyAsync (direct)");
    }
    st.enqueue_s = since(t0);

    auto t1 = std::chrono::steady_clock::now();
    if (!chunks.empty()) {
      size_t slots = std::max<size_t>(1, ring_bytes / slot_bytes);
      std::vector<std::unique_ptr<Event>> landed(slots);
      auto issue = [&](size_t i) {
        const Chunk& c = chunks[i];
        size_t slot = i % slots;
        guard.set(c.device);
        landed[slot] = std::make_unique<Event>();
        check(cudaMemcpyAsync(ring + slot * slot_bytes, reinterpret_cast<const void*>(c.src), c.n,
                              cudaMemcpyDeviceToHost, ring_streams[c.device]),
              "cudaMemcpyAsync (ring)");
        check(cudaEventRecord(landed[slot]->e, ring_streams[c.device]), "cudaEventRecord (ring)");
      };
      for (size_t i = 0; i < std::min(slots, chunks.size()); ++i) issue(i);
      for (size_t i = 0; i < chunks.size(); ++i) {
        size_t slot = i % slots;
        check(cudaEventSynchronize(landed[slot]->e), "cudaEventSynchronize (ring chunk)");
        drain(chunks[i].dst, ring + slot * slot_bytes, chunks[i].n, threads);
        if (i + slots < chunks.size()) issue(i + slots);
      }
    }
    st.stream_s = since(t1);

    auto t2 = std::chrono::steady_clock::now();
    for (auto& [device, ds] : direct_streams) {
      guard.set(device);
      Event done;
      check(cudaEventRecord(done.e, ds), "cudaEventRecord (copies done)");
      check(cudaEventSynchronize(done.e), "cudaEventSynchronize (copies done)");
    }
    st.wait_s = since(t2);
  } catch (...) {
    // No copy may still be landing in memory the caller frees after the error.
    for (auto* m : {&direct_streams, &ring_streams})
      for (auto& [device, s] : *m) {
        if (cudaSetDevice(device) == cudaSuccess) cudaStreamSynchronize(s);
        cudaGetLastError();
      }
    throw;
  }
  return st;
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

std::string device_problem() {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
  }
  return n == 0 ? "no CUDA device" : "";
}

int runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

size_t pinned_bytes_held() { return g_pinned_held.load(); }
size_t pinned_allocations() { return g_pinned_allocs.load(); }
size_t copy_streams() {
  std::lock_guard<std::mutex> lock(g_streams_mu);
  return g_streams.size();
}

}  // namespace shardckpt_cuda
