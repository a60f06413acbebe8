// A persistent worker pool for block-parallel encode/decode.
//
// Threads are created on first use and then live for the whole process, so a
// save does not pay thread start-up per tensor and the per-thread zstd
// contexts (see codec.cpp) stay warm. The calling thread always works too:
// with `threads` = T, T-1 pool workers help it.
#pragma once

#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdlib>

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace shardckpt {

class ThreadPool {
 public:
  // The process-wide pool. After fork() the child gets a fresh one: the
  // parent's worker threads do not exist there, and the old pool's mutex may
  // have been copied in a locked state, so it is abandoned, never touched.
  static ThreadPool& instance() {
    static std::mutex mu;
    static ThreadPool* pool = nullptr;
    static pid_t owner = 0;
    std::lock_guard<std::mutex> lock(mu);
    if (pool == nullptr || owner != getpid()) {
      // Deliberately leaked: joining workers from a static destructor races
      // interpreter shutdown, and the OS reclaims the threads at exit anyway.
      pool = new ThreadPool();
      owner = getpid();
    }
    return *pool;
  }

  // Calls fn(i) for every i in [0, n), on up to `threads` threads, and returns
  // when all calls have finished. fn must not throw (errors are the caller's
  // to record per item); a stray exception is rethrown here.
  void parallel_for(size_t n, int threads, const std::function<void(size_t)>& fn) {
    if (n == 0) return;
    const size_t helpers = std::min<size_t>(n - 1, threads > 1 ? threads - 1 : 0);
    if (helpers == 0) {
      for (size_t i = 0; i < n; ++i) fn(i);
      return;
    }
    auto job = std::make_shared<Job>();
    job->n = n;
    job->fn = &fn;
    {
      std::lock_guard<std::mutex> lock(mu_);
      grow(helpers);
      for (size_t h = 0; h < helpers; ++h) queue_.push_back(job);
    }
    cv_.notify_all();
    run(*job);
    std::unique_lock<std::mutex> lock(job->mu);
    job->cv.wait(lock, [&] { return job->done == job->n; });
    if (job->error) std::rethrow_exception(job->error);
  }

 private:
  struct Job {
    size_t n = 0;
    // Valid only while done < n; a helper that claims an index >= n never
    // dereferences it, which is what makes returning early safe.
    const std::function<void(size_t)>* fn = nullptr;
    std::atomic<size_t> next{0};
    size_t done = 0;  // guarded by mu
    std::exception_ptr error;
    std::mutex mu;
    std::condition_variable cv;
  };

  ThreadPool() = default;

  // Claims indices until none are left. Claiming one at a time balances
  // blocks of very different cost (noise planes are stored raw, cheap).
  static void run(Job& job) {
    for (;;) {
      const size_t i = job.next.fetch_add(1);
      if (i >= job.n) return;
      std::exception_ptr err;
      try {
        (*job.fn)(i);
      } catch (...) {
        err = std::current_exception();
      }
      std::lock_guard<std::mutex> lock(job.mu);
      if (err && !job.error) job.error = err;
      if (++job.done == job.n) job.cv.notify_all();
    }
  }

  // Called with mu_ held.
  void grow(size_t want) {
    constexpr size_t kMaxWorkers = 256;
    want = std::min(want, kMaxWorkers);
    while (workers_.size() < want) {
      workers_.emplace_back([this] {
        lower_priority();
        loop();
      });
      workers_.back().detach();
    }
  }

  // Checkpoint work runs beside the training loop; a higher nice value lets
  // training threads win the CPU while a background save encodes. When nothing
  // else runs (a blocking save) it costs nothing. SHARDCKPT_WORKER_NICE=0 opts out.
  static void lower_priority() {
    const char* env = std::getenv("SHARDCKPT_WORKER_NICE");
    int nice = env ? std::atoi(env) : 10;
    if (nice > 0) setpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)), nice);
  }

  void loop() {
    for (;;) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return !queue_.empty(); });
        job = std::move(queue_.front());
        queue_.pop_front();
      }
      run(*job);
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Job>> queue_;
  std::vector<std::thread> workers_;
};

}  // namespace shardckpt
