// What the CPU (and the OS) can execute: the probe behind the choice of CPU kernel variant
// (fastbert/cpu_variants.py).  Part of the portable core module, built with no
// instruction-set flags, so it runs on any CPU.
//
// x86-64: CPUID for the instruction sets, and XGETBV for whether the OS saves the AVX /
// AVX-512 registers on a context switch (a CPU with AVX-512 under an OS that does not enable
// its state must not run AVX-512 code); the same checks ATen's cpuinfo makes.  Other
// architectures report nothing, which selects the portable `default` variant.
#include <torch/library.h>

#include <string>
#include <vector>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#define FASTBERT_X86_CPUID 1
#endif

namespace fastbert {
namespace {

std::vector<std::string> cpu_features() {
  std::vector<std::string> out;
#ifdef FASTBERT_X86_CPUID
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(0, &a, &b, &c, &d)) return out;
  const unsigned max_leaf = a;
  __cpuid(1, a, b, c, d);
  const bool osxsave = c & (1u << 27);
  unsigned long long xcr0 = 0;
  if (osxsave) {
    unsigned lo = 0, hi = 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));  // the raw opcode needs no -mxsave
    xcr0 = (static_cast<unsigned long long>(hi) << 32) | lo;
  }
  const bool os_avx = (xcr0 & 0x6) == 0x6;        // XMM and YMM state
  const bool os_avx512 = (xcr0 & 0xE6) == 0xE6;   // plus opmask, ZMM_Hi256, Hi16_ZMM
  auto add = [&out](bool has, const char* name) { if (has) out.emplace_back(name); };
  add(d & (1u << 26), "sse2");
  add(c & (1u << 20), "sse4_2");
  add(os_avx && (c & (1u << 28)), "avx");
  add(os_avx && (c & (1u << 12)), "fma");
  add(os_avx && (c & (1u << 29)), "f16c");
  if (max_leaf >= 7) {
    __cpuid_count(7, 0, a, b, c, d);
    const unsigned ebx7 = b;
    add(os_avx && (ebx7 & (1u << 5)), "avx2");
    add(ebx7 & (1u << 3), "bmi1");
    add(ebx7 & (1u << 8), "bmi2");
    add(os_avx512 && (ebx7 & (1u << 16)), "avx512f");
    add(os_avx512 && (ebx7 & (1u << 17)), "avx512dq");
    add(os_avx512 && (ebx7 & (1u << 30)), "avx512bw");
    add(os_avx512 && (ebx7 & (1u << 31)), "avx512vl");
    add(os_avx512 && (c & (1u << 11)), "avx512_vnni");
    __cpuid_count(7, 1, a, b, c, d);
    add(os_avx512 && (a & (1u << 5)), "avx512_bf16");
  }
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastbert, m) {
  // The CPU's features, as fastbert/cpu_variants.py names them (empty off x86-64).
  m.def("_cpu_features() -> str[]", &cpu_features);
}

}  // namespace fastbert
