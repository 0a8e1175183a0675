// Transparent huge pages for the large outputs of the CPU kernels (no torch here).
//
// A fresh CPU tensor of more than a few MiB is new memory from mmap, and the first write to each of
// its 4 KiB pages is a page fault in which the kernel zeroes that page. For a write-mostly kernel
// (extract_patches writes 321 MB at the CPC-AD shape, fold_patches 38 MB) these faults, not the
// kernel's loop, set the speed: on a 2-core EPYC VM (THP "madvise") the CPC-AD extract_patches
// forward took 146 ms with 4 KiB pages and 32 ms with its output advised to use 2 MiB pages, the fold
// 19 -> 5.5 ms (bench/README.md). advise_huge_pages does what torch's THP_MEM_ALLOC_ENABLE=1 does for
// every allocation (c10/core/alloc_cpu.cpp), for one buffer about to be written and only inside it:
// madvise(MADV_HUGEPAGE) on the 2 MiB-aligned part of [data, data + bytes), before the first touch.
// It never changes a value, and is a no-op off Linux, below one huge page, with THP "never", or when
// switched off (pyanomaly.ops.huge_pages(False), or PYANOMALY_HUGE_PAGES=0 in the environment). Where
// the hypervisor takes back freed guest memory (free page reporting, as on that VM), a huge page can
// cost a host fault: single calls then took 0.3-1.9 s, and in a process that also allocated and freed
// the reference's outputs the median was 1.2-3x the 4 KiB path's in two runs of three (0.4x in the
// third); pyanomaly._ext therefore switches
// the default off on such guests (host_reclaims_free_memory) unless PYANOMALY_HUGE_PAGES is set.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace pyanomaly {

inline bool huge_pages_default() {
  const char* env = std::getenv("PYANOMALY_HUGE_PAGES");
  return env == nullptr || std::strcmp(env, "0") != 0;
}

inline std::atomic<bool>& huge_pages_enabled() {
  static std::atomic<bool> enabled{huge_pages_default()};
  return enabled;
}

inline void advise_huge_pages(void* data, std::size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr std::uintptr_t kHugePage = std::uintptr_t(1) << 21;  // 2 MiB, x86-64 and arm64 with 4 KiB pages
  if (!huge_pages_enabled().load(std::memory_order_relaxed) || data == nullptr) return;
  const auto begin = reinterpret_cast<std::uintptr_t>(data);
  const std::uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const std::uintptr_t last = (begin + bytes) & ~(kHugePage - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // advice: errors ignored
#else
  (void)data;
  (void)bytes;
#endif
}

}  // namespace pyanomaly
