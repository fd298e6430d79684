// A caching CPU allocator for large blocks.
//
// Why: a training step allocates and frees the same large tensors every step (Adam's
// temporaries over the 20,256 x 256 token embedding, the embedding's dense gradient, the
// activations).  glibc hands blocks that large back to the kernel on free, so every step
// page-faults them in again: measured here, `x.sqrt()` on a 20 MB tensor takes 3.6 ms with a
// fresh allocation and 1.3 ms into an existing one, and in the bert.small bf16 train step
// Adam's sqrt / div and the gradient's zero fill took ~40% of the step.  PyTorch's CPU
// performance guide recommends tcmalloc/jemalloc through LD_PRELOAD for this; this is the
// same idea without a preload: freed blocks of at least kMinBytes are kept, by size class,
// and handed out again.
//
// Nothing installs it when the library loads: fastbert's training entry points (or the user,
// fastbert.enable_cpu_cache) call enable_cpu_caching_allocator (fastbert/cpu_cache.py).
//
// What it touches:
// - Blocks it does not cache (below kMinBytes, or allocated while paused or at limit 0) come
//   from the allocator it replaced (c10's default) with that allocator's own deleter: their
//   free never reaches this file, so they take no lock of ours.
// - Cached-size blocks carry `release` as deleter; one mutex guards the cache (large blocks
//   are few per step).
// - fork(): pthread_atfork handlers hold the mutex across the fork, so a child never inherits
//   it locked by a thread that does not exist in the child (DataLoader workers fork while
//   other threads may be freeing tensors).  The child keeps the cache's state (its blocks are
//   the parent's pages, copy-on-write).
// - Pause: a process-wide depth (paused while > 0), so pauses nest and several threads can
//   pause and resume independently.  The pause decides where a block comes from at
//   allocation; a cached block freed while paused is kept for reuse as usual (a pause in one
//   thread must not flush the cache another thread is training with).
//
// Size classes: 8 per power of two (at most 12.5% slack), so the packed token count varying
// a little from batch to batch still hits the cache.  The cache holds at most `limit` bytes:
// a freed block that would exceed it evicts the least recently freed blocks (LRU), so sizes
// a program stopped using do not keep the cache full.  The allocator object lives for the
// whole process (never destroyed), so tensors freed at exit still find it.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <pthread.h>

#include <atomic>
#include <cstring>
#include <list>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace fastbert {
namespace {

constexpr size_t kMinBytes = size_t(1) << 20;  // 1 MiB

size_t size_class(size_t n) {
  size_t pow2 = size_t(1) << (63 - __builtin_clzll(n));  // highest power of two <= n
  const size_t step = std::max<size_t>(pow2 / 8, 4096);
  return (n + step - 1) / step * step;
}

// Outside the allocator so a pause taken before the allocator is installed still counts.
std::atomic<int64_t> g_pause_depth{0};

class CachingCPUAllocator final : public c10::Allocator {
 public:
  explicit CachingCPUAllocator(c10::Allocator* fallback) : fallback_(fallback) {}

  c10::DataPtr allocate(size_t n) override {
    if (n < kMinBytes || g_pause_depth.load(std::memory_order_relaxed) > 0 ||
        limit_.load(std::memory_order_relaxed) == 0) {
      return fallback_->allocate(n);  // its own deleter: the free never comes back here
    }
    const size_t cls = size_class(n);
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.find(cls);
      if (it != free_.end() && !it->second.empty()) {  // the most recently freed block
        p = it->second.back()->p;
        lru_.erase(it->second.back());
        it->second.pop_back();
        cached_ -= cls;
        ++hits_;
      } else {
        ++misses_;
      }
    }
    if (p == nullptr) p = c10::alloc_cpu(cls);
    {
      std::lock_guard<std::mutex> lock(mu_);
      live_[p] = cls;
    }
    return {p, p, &release, c10::Device(c10::DeviceType::CPU)};
  }

  // raw_deallocate sees blocks of both kinds: `release` tells them apart.
  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }

  void set_limit(size_t limit) {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      limit_.store(limit, std::memory_order_relaxed);
      evict_until(limit, drop);
    }
    for (void* p : drop) c10::free_cpu(p);
  }

  void empty() {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      evict_until(0, drop);
    }
    for (void* p : drop) c10::free_cpu(p);
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {static_cast<int64_t>(cached_), static_cast<int64_t>(limit_.load()),
            static_cast<int64_t>(hits_), static_cast<int64_t>(misses_),
            static_cast<int64_t>(live_.size())};
  }

  // pthread_atfork: the forking thread holds the mutex across fork(), so no other thread
  // can be inside it at the moment of the fork; both sides release it after.
  static void before_fork() { instance->mu_.lock(); }
  static void after_fork() { instance->mu_.unlock(); }

  static CachingCPUAllocator* instance;

 private:
  struct Block {
    size_t cls;
    void* p;
  };
  using LruIt = std::list<Block>::iterator;

  static void release(void* p) {
    if (p != nullptr) instance->give_back(p);
  }

  // With the lock held: release the least recently freed blocks until at most `target`
  // bytes stay cached (their pointers go to `drop`, freed after the lock).
  void evict_until(size_t target, std::vector<void*>& drop) {
    while (cached_ > target && !lru_.empty()) {
      const Block oldest = lru_.front();
      auto& stack = free_[oldest.cls];  // freeing order: the class's oldest block is first
      stack.erase(stack.begin());
      lru_.pop_front();
      cached_ -= oldest.cls;
      drop.push_back(oldest.p);
    }
  }

  void give_back(void* p) {
    bool ours = false, keep = false;
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = live_.find(p);
      if (it != live_.end()) {
        ours = true;
        const size_t cls = it->second;
        const size_t limit = limit_.load(std::memory_order_relaxed);
        live_.erase(it);
        if (cls <= limit) {
          // Room for the block just freed, at the expense of the stalest: blocks of sizes a
          // program no longer uses (a data-loading phase, another model) must not crowd the
          // cache out for good.
          evict_until(limit - cls, drop);
          free_[cls].push_back(lru_.insert(lru_.end(), Block{cls, p}));
          cached_ += cls;
          keep = true;
        }
      }
    }
    for (void* q : drop) c10::free_cpu(q);
    if (ours) {
      if (!keep) c10::free_cpu(p);
    } else {  // a fallback block freed through raw_deallocate
      c10::DeleterFnPtr d = fallback_->raw_deleter();
      d != nullptr ? d(p) : c10::free_cpu(p);
    }
  }

  c10::Allocator* const fallback_;
  std::mutex mu_;
  std::list<Block> lru_;                                  // cached blocks, least recently freed first
  std::unordered_map<size_t, std::vector<LruIt>> free_;   // size class -> its cached blocks, by freeing order
  std::unordered_map<void*, size_t> live_;                // handed-out cached-size block -> size class
  size_t cached_ = 0, hits_ = 0, misses_ = 0;
  std::atomic<size_t> limit_{0};                          // read without the lock by allocate
};

CachingCPUAllocator* CachingCPUAllocator::instance = nullptr;

// Install once (higher priority than the default CPU allocator); later calls set the limit.
void enable_cpu_caching_allocator(int64_t limit_mb) {
  TORCH_CHECK(limit_mb >= 0, "enable_cpu_caching_allocator: limit_mb must be >= 0, got ",
              limit_mb);
  static std::once_flag once;
  std::call_once(once, [] {
    CachingCPUAllocator::instance = new CachingCPUAllocator(c10::GetCPUAllocator());
    const int rc = pthread_atfork(&CachingCPUAllocator::before_fork,
                                  &CachingCPUAllocator::after_fork,
                                  &CachingCPUAllocator::after_fork);
    TORCH_CHECK(rc == 0, "enable_cpu_caching_allocator: pthread_atfork failed (", rc, ")");
    c10::SetCPUAllocator(CachingCPUAllocator::instance, /*priority=*/1);
  });
  CachingCPUAllocator::instance->set_limit(static_cast<size_t>(limit_mb) << 20);
}

// Give every cached block back to the system; the limit stays.  A no-op when not installed.
void empty_cpu_caching_allocator() {
  if (CachingCPUAllocator::instance != nullptr) CachingCPUAllocator::instance->empty();
}

// paused=true: one more pause level; paused=false: one fewer (a resume without a pause is an
// error, not a silent clamp: it would end someone else's pause).
void pause_cpu_caching_allocator(bool paused) {
  if (paused) {
    g_pause_depth.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  int64_t depth = g_pause_depth.load(std::memory_order_relaxed);
  do {
    TORCH_CHECK(depth > 0, "pause_cpu_caching_allocator(False): the cache is not paused");
  } while (!g_pause_depth.compare_exchange_weak(depth, depth - 1, std::memory_order_relaxed));
}

// [cached bytes, limit bytes, hits, misses, live blocks, installed, pause depth,
//  torch's CPU allocator is c10's default]; the first five are zero when not installed.
std::vector<int64_t> cpu_caching_allocator_stats() {
  auto* self = CachingCPUAllocator::instance;
  std::vector<int64_t> s = self ? self->stats() : std::vector<int64_t>(5, 0);
  s.push_back(self != nullptr && c10::GetCPUAllocator() == self);
  s.push_back(g_pause_depth.load(std::memory_order_relaxed));
  s.push_back(c10::GetCPUAllocator() == c10::GetDefaultCPUAllocator());
  return s;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastbert, m) {
  m.def("enable_cpu_caching_allocator(int limit_mb) -> ()", &enable_cpu_caching_allocator);
  m.def("empty_cpu_caching_allocator() -> ()", &empty_cpu_caching_allocator);
  m.def("cpu_caching_allocator_stats() -> int[]", &cpu_caching_allocator_stats);
  m.def("pause_cpu_caching_allocator(bool paused) -> ()", &pause_cpu_caching_allocator);
}

}  // namespace fastbert
