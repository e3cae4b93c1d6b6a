// The block pool behind empty_output and gather_scratch: see csrc/include/diffcore/memory.h.
// Compiled in the DEFAULT build only: one pool per process.
#if defined(DIFFCORE_CPU_ENTRY)
#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/CPUAllocator.h>

#include <diffcore/memory.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <vector>

#if defined(__unix__)
#include <pthread.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace diffcore {
namespace {

constexpr size_t kPoolMinBytes = size_t{1} << 20;  // smaller blocks: glibc's heap serves them well
constexpr size_t kPoolBlocks = 8;  // blocks kept at most
constexpr size_t kHugePageBytes = size_t{2} << 20;

// DIFFCORE_POOL_MB (read once): the bytes of freed blocks the pool keeps at most.
size_t pool_cap_bytes() {
  static const size_t cap = [] {
    const char* v = std::getenv("DIFFCORE_POOL_MB");
    char* end = nullptr;
    const long long mb = v != nullptr ? std::strtoll(v, &end, 10) : 1024;
    TORCH_CHECK(v == nullptr || (end != v && *end == '\0' && mb >= 0),
                "DIFFCORE_POOL_MB: expected a non-negative integer (MiB), got '", v, "'");
    constexpr long long kMaxMb = static_cast<long long>(SIZE_MAX >> 21);  // more than any machine: no cap
    return static_cast<size_t>(std::min(mb, kMaxMb)) << 20;  // a larger value would wrap to 0
  }();
  return cap;
}

// Advises the 2 MiB-aligned interior of [p, p + bytes) as MADV_HUGEPAGE.
void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const auto start = reinterpret_cast<uintptr_t>(p), mask = static_cast<uintptr_t>(kHugePageBytes - 1);
  const uintptr_t first = (start + mask) & ~mask, last = (start + bytes) & ~mask;
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

// One block: memory from torch's CPU allocator, owned while a tensor uses it or the pool keeps it.
struct Block {
  c10::DataPtr memory;
  size_t bytes;
};

struct Kept {
  std::mutex mutex;
  std::vector<std::unique_ptr<Block>> blocks;  // the most recently freed last
  size_t bytes = 0;
};

// Never destroyed: tensors freed during interpreter shutdown still return their blocks here. A
// fork waits for the pool's lock, so the child (a DataLoader worker, say) never starts with it held.
Kept& kept() {
  static Kept* k = [] {
    auto* created = new Kept();
#if defined(__unix__)
    pthread_atfork([] { kept().mutex.lock(); }, [] { kept().mutex.unlock(); }, [] { kept().mutex.unlock(); });
#endif
    return created;
  }();
  return *k;
}

// A tensor's storage deleter: the block goes back to the pool, the oldest kept ones beyond the caps
// are freed (outside the lock).
void give_back(void* ctx) {
  std::unique_ptr<Block> block(static_cast<Block*>(ctx));
  std::vector<std::unique_ptr<Block>> freed;
  {
    Kept& k = kept();
    std::lock_guard<std::mutex> lock(k.mutex);
    k.bytes += block->bytes;
    k.blocks.push_back(std::move(block));
    size_t drop = 0;
    while (drop < k.blocks.size() && (k.blocks.size() - drop > kPoolBlocks || k.bytes > pool_cap_bytes())) {
      k.bytes -= k.blocks[drop]->bytes;
      freed.push_back(std::move(k.blocks[drop++]));
    }
    k.blocks.erase(k.blocks.begin(), k.blocks.begin() + static_cast<std::ptrdiff_t>(drop));
  }
}

// The allocator of pooled tensors' storages (also what resizing such a storage calls).
class PoolAllocator final : public c10::Allocator {
 public:
  explicit PoolAllocator(bool advise) : advise_(advise) {}

  c10::DataPtr allocate(size_t n) override {
    if (n < kPoolMinBytes || pool_cap_bytes() == 0) return c10::GetCPUAllocator()->allocate(n);
    std::unique_ptr<Block> block;
    {
      Kept& k = kept();
      std::lock_guard<std::mutex> lock(k.mutex);
      for (auto it = k.blocks.rbegin(); it != k.blocks.rend(); ++it) {
        if ((*it)->bytes == n) {
          block = std::move(*it);
          k.blocks.erase(std::next(it).base());
          k.bytes -= n;
          break;
        }
      }
    }
    if (block == nullptr) {
      block = std::make_unique<Block>(Block{c10::GetCPUAllocator()->allocate(n), n});
      if (advise_) advise_huge_pages(block->memory.get(), n);
    }
    void* data = block->memory.get();
    return {data, block.release(), &give_back, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  bool advise_;
};

}  // namespace

at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options, bool advise) {
  if (!options.device().is_cpu()) return at::empty(sizes, options);
  // Never destroyed: a storage keeps its allocator for resizing.
  static PoolAllocator* plain = new PoolAllocator(false);
  static PoolAllocator* advised = new PoolAllocator(true);
  return at::detail::empty_generic(sizes, advise ? advised : plain, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), std::nullopt);
}

int64_t release_pool() {
  std::vector<std::unique_ptr<Block>> freed;
  Kept& k = kept();
  std::lock_guard<std::mutex> lock(k.mutex);
  freed.swap(k.blocks);
  const auto bytes = static_cast<int64_t>(k.bytes);
  k.bytes = 0;
  return bytes;
}

std::pair<int64_t, int64_t> pool_kept() {
  Kept& k = kept();
  std::lock_guard<std::mutex> lock(k.mutex);
  return {static_cast<int64_t>(k.blocks.size()), static_cast<int64_t>(k.bytes)};
}

}  // namespace diffcore
#endif
