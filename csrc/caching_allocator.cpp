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
// and handed out again.  Smaller blocks are allocated and freed at once, as by c10's default.
//
// Size classes: 8 per power of two (at most 12.5% slack), so the packed token count varying
// a little from batch to batch still hits the cache.  The cache holds at most `limit` bytes:
// a freed block that would exceed it evicts the least recently freed blocks (LRU), so sizes
// a program stopped using do not keep the cache full.  Thread-safe (one mutex: large blocks are
// few per step).  The allocator object lives for the whole process (never destroyed), so
// tensors freed at exit still find it.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

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

class CachingCPUAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n < kMinBytes || paused_.load(std::memory_order_relaxed)) {  // straight to c10's allocation
      void* small = c10::alloc_cpu(n);
      return {small, small, &release, c10::Device(c10::DeviceType::CPU)};
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

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }

  void set_limit(size_t limit) {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      limit_ = limit;
      evict_until(limit_, drop);
    }
    for (void* p : drop) c10::free_cpu(p);
  }

  // Paused: allocations bypass the cache and frees release at once (as c10's allocator does);
  // the blocks cached before stay for when it resumes.
  void set_paused(bool paused) { paused_.store(paused, std::memory_order_relaxed); }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {static_cast<int64_t>(cached_), static_cast<int64_t>(limit_),
            static_cast<int64_t>(hits_), static_cast<int64_t>(misses_),
            static_cast<int64_t>(live_.size()), 1};
  }

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
    bool keep = false;
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = live_.find(p);
      if (it != live_.end()) {  // else a small block: freed below
        const size_t cls = it->second;
        live_.erase(it);
        if (!paused_.load(std::memory_order_relaxed) && cls <= limit_) {
          // Room for the block just freed, at the expense of the stalest: blocks of sizes a
          // program no longer uses (a data-loading phase, another model) must not crowd the
          // cache out for good.
          evict_until(limit_ - cls, drop);
          free_[cls].push_back(lru_.insert(lru_.end(), Block{cls, p}));
          cached_ += cls;
          keep = true;
        }
      }
    }
    for (void* q : drop) c10::free_cpu(q);
    if (!keep) c10::free_cpu(p);
  }

  std::mutex mu_;
  std::list<Block> lru_;                                  // cached blocks, least recently freed first
  std::unordered_map<size_t, std::vector<LruIt>> free_;   // size class -> its cached blocks, by freeing order
  std::unordered_map<void*, size_t> live_;                // handed-out block -> size class
  size_t cached_ = 0, limit_ = 0, hits_ = 0, misses_ = 0;
  std::atomic<bool> paused_{false};
};

CachingCPUAllocator* CachingCPUAllocator::instance = nullptr;

// Install once (higher priority than the default CPU allocator); later calls set the limit.
void enable_cpu_caching_allocator(int64_t limit_mb) {
  TORCH_CHECK(limit_mb >= 0, "enable_cpu_caching_allocator: limit_mb must be >= 0");
  static std::once_flag once;
  std::call_once(once, [] {
    CachingCPUAllocator::instance = new CachingCPUAllocator();
    c10::SetCPUAllocator(CachingCPUAllocator::instance, /*priority=*/1);
  });
  CachingCPUAllocator::instance->set_limit(static_cast<size_t>(limit_mb) << 20);
}

// Pause (or resume) the cache; a no-op when it is not installed.
void pause_cpu_caching_allocator(bool paused) {
  if (CachingCPUAllocator::instance != nullptr) CachingCPUAllocator::instance->set_paused(paused);
}

// [cached bytes, limit bytes, hits, misses, live blocks, installed]; all zero when not installed.
std::vector<int64_t> cpu_caching_allocator_stats() {
  if (CachingCPUAllocator::instance == nullptr) return {0, 0, 0, 0, 0, 0};
  return CachingCPUAllocator::instance->stats();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastbert, m) {
  m.def("enable_cpu_caching_allocator(int limit_mb) -> ()", &enable_cpu_caching_allocator);
  m.def("cpu_caching_allocator_stats() -> int[]", &cpu_caching_allocator_stats);
  m.def("pause_cpu_caching_allocator(bool paused) -> ()", &pause_cpu_caching_allocator);
}

}  // namespace fastbert
