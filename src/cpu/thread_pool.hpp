// The CPU backend's worker threads: one process-wide pool, parallel_for over work items.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace clsa {
namespace detail {

class ThreadPool {
 public:
  /// The process-wide pool: CLSA_NUM_THREADS workers if set, else the hardware's thread count.
  static ThreadPool& instance();

  explicit ThreadPool(int threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  /// Threads that run items, the caller included; worker indices are [0, size()).
  int size() const { return static_cast<int>(workers_.size()) + 1; }

  /// Runs body(item, worker) for every item in [0, count), items handed out one at a time, and
  /// returns when all are done. The first exception thrown by a body is rethrown here. Calls
  /// from inside a body run serially on the calling worker (no nesting deadlock).
  template <class Body>
  void parallel_for(std::int64_t count, Body&& body) {
    run(
        count, [](void* context, std::int64_t item, int worker) { (*static_cast<Body*>(context))(item, worker); },
        &body);
  }

 private:
  using Trampoline = void (*)(void*, std::int64_t, int);
  void run(std::int64_t count, Trampoline trampoline, void* context);
  void work(int worker);
  void drain(int worker);

  std::vector<std::thread> workers_;
  std::mutex call_mutex_;  // one parallel_for at a time
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  std::uint64_t generation_ = 0;
  bool stopping_ = false;
  Trampoline trampoline_ = nullptr;
  void* context_ = nullptr;
  std::int64_t count_ = 0;
  std::atomic<std::int64_t> next_{0};
  int active_ = 0;
  std::exception_ptr error_;
};

}  // namespace detail
}  // namespace clsa
