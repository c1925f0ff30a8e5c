#include "cpu/thread_pool.hpp"

#include <cstdlib>
#include <exception>

namespace clsa {
namespace detail {

namespace {
thread_local bool inside_pool_body = false;
}

ThreadPool& ThreadPool::instance() {
  static ThreadPool pool([] {
    if (const char* value = std::getenv("CLSA_NUM_THREADS")) {
      const int requested = std::atoi(value);
      if (requested > 0) return requested;
    }
    const unsigned hardware = std::thread::hardware_concurrency();
    return hardware > 0 ? static_cast<int>(hardware) : 1;
  }());
  return pool;
}

ThreadPool::ThreadPool(int threads) {
  for (int i = 1; i < threads; ++i) workers_.emplace_back([this, i] { work(i); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  for (std::thread& worker : workers_) worker.join();
}

void ThreadPool::drain(int worker) {
  for (;;) {
    const std::int64_t item = next_.fetch_add(1, std::memory_order_relaxed);
    if (item >= count_) return;
    try {
      trampoline_(context_, item, worker);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!error_) error_ = std::current_exception();
      next_.store(count_, std::memory_order_relaxed);  // stop handing out items
    }
  }
}

void ThreadPool::run(std::int64_t count, Trampoline trampoline, void* context) {
  if (count <= 0) return;
  if (inside_pool_body || workers_.empty() || count == 1) {
    for (std::int64_t item = 0; item < count; ++item) trampoline(context, item, 0);
    return;
  }
  std::lock_guard<std::mutex> call_lock(call_mutex_);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    trampoline_ = trampoline;
    context_ = context;
    count_ = count;
    next_.store(0, std::memory_order_relaxed);
    error_ = nullptr;
    active_ = static_cast<int>(workers_.size());
    ++generation_;
  }
  wake_.notify_all();
  inside_pool_body = true;
  drain(0);
  inside_pool_body = false;
  std::unique_lock<std::mutex> lock(mutex_);
  done_.wait(lock, [this] { return active_ == 0; });
  if (error_) std::rethrow_exception(error_);
}

void ThreadPool::work(int worker) {
  inside_pool_body = true;
  std::uint64_t seen = 0;
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] { return stopping_ || generation_ != seen; });
      if (stopping_) return;
      seen = generation_;
    }
    drain(worker);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      --active_;
    }
    done_.notify_one();
  }
}

}  // namespace detail
}  // namespace clsa
