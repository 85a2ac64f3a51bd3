// simvq-kernels: run-time configuration of the CPU kernel (instruction set and tile).
//
// The kernel adapts to the processor it runs on: its vector code (the register-blocked
// GEMM + argmin for float32, the tile products and argmin of the FMA-tile path) is picked from what the
// CPU supports, and the tile (tokens x codes) from the L2
// cache share of a core, read once from /sys/devices/system/cpu/cpu0/cache (sysconf as
// a fallback). The FMA-tile path (float64, scalar ISA) uses the tile as it is; the
// register-blocked path rounds a set tile's codes up to whole 32- (AVX-512) or 16-code
// (AVX2) panels, and with an automatic tile sizes the packed code tile by d (a quarter
// of the L2 share) and rounds the tokens up to whole blocks.
// Environment overrides, read once per process on the kernel's first use:
//
//   SIMVQ_CPU_ISA  = auto | scalar | avx2 | avx512   vector code to run (the CPU must
//                                                     support it)
//   SIMVQ_CPU_TILE = auto | <tokens>x<codes>         e.g. 128x1024
//   SIMVQ_CPU_L2   = auto | <bytes>[K|M]             L2 share the tile is chosen for,
//                                                     e.g. 512K (a stand-in for a
//                                                     smaller-cache CPU)
//
// torch.ops.simvq.cpu_kernel_config() returns the configuration in effect (JSON text);
// torch.ops.simvq.set_cpu_kernel_config(isa, tile, l2) changes it for the process
// (same syntax; None leaves a setting as it is), which is how tests run every path.
// Every configuration is deterministic on its own: the result depends on the inputs,
// the ISA and the tile, never on the thread count.
#pragma once

#include <cstdint>
#include <string>

namespace simvq {
namespace cpu {

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

const char* isa_name(Isa isa);

// Whether this CPU (and its OS) runs the vector code of `isa` (kAvx2 means AVX2 + FMA).
bool cpu_supports(Isa isa);

struct KernelConfig {
  Isa isa;              // vector code the kernel runs
  Isa native;           // best the CPU supports
  int64_t tile_n;       // tokens per tile
  int64_t tile_k;       // codes per tile
  int64_t l1d, l2, l3;  // cache sizes in bytes (per instance; 0 if unknown)
  int64_t l2_share;     // L2 bytes per core the tile is chosen for
  std::string isa_from, tile_from, l2_from, caches_from;
};

// The configuration in effect (a copy; cheap). The first call reads the environment and
// the cache sizes; a bad environment value raises an error naming the variable (and
// raises again on every later call until the process fixes it with set_config).
KernelConfig config();

// The fp32 tile chosen for an L2 share of `l2_share` bytes.
void choose_tile(int64_t l2_share, int64_t* tile_n, int64_t* tile_k);

}  // namespace cpu
}  // namespace simvq
