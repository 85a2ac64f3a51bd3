// simvq-kernels: run-time configuration of the CPU kernel (see cpu_config.h).
#include "cpu_config.h"

#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>

#include "../simvq.h"

namespace simvq {
namespace cpu {

// ------------------------------------------------------------------ detection

bool cpu_supports(Isa isa) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  switch (isa) {
    case Isa::kScalar:
      return true;
    case Isa::kAvx2:  // the AVX2 code uses FMA3 too (every AVX2 CPU but a few VIA has it)
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::kAvx512:  // libgcc also checks that the OS saves the AVX-512 state
      return __builtin_cpu_supports("avx512f") && cpu_supports(Isa::kAvx2);
  }
  return false;
#else
  return isa == Isa::kScalar;
#endif
}

namespace {

Isa native_isa() {
  if (cpu_supports(Isa::kAvx512)) return Isa::kAvx512;
  if (cpu_supports(Isa::kAvx2)) return Isa::kAvx2;
  return Isa::kScalar;
}

std::string read_line(const std::string& path) {
  std::ifstream f(path);
  std::string s;
  if (f) std::getline(f, s);
  return s;
}

// "48K", "1024K", "32M", "524288" -> bytes; -1 if it does not parse.
int64_t parse_size(std::string s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.pop_back();
  size_t i = 0;
  while (i < s.size() && std::isspace(static_cast<unsigned char>(s[i]))) ++i;
  s = s.substr(i);
  if (s.empty() || !std::isdigit(static_cast<unsigned char>(s[0]))) return -1;
  size_t pos = 0;
  long long v = 0;
  try {
    v = std::stoll(s, &pos);
  } catch (const std::exception&) {
    return -1;
  }
  std::string unit = s.substr(pos);
  for (auto& c : unit) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  int64_t mult = 1;
  if (unit.empty() || unit == "B") mult = 1;
  else if (unit == "K" || unit == "KB" || unit == "KIB") mult = 1024;
  else if (unit == "M" || unit == "MB" || unit == "MIB") mult = 1024 * 1024;
  else return -1;
  if (v <= 0 || v > (int64_t(1) << 40) / mult) return -1;
  return int64_t(v) * mult;
}

// Number of CPUs in a list such as "0-3,8-11" (0 if it does not parse).
int count_cpu_list(const std::string& s) {
  int n = 0;
  std::stringstream ss(s);
  std::string part;
  while (std::getline(ss, part, ',')) {
    if (part.empty()) continue;
    const auto dash = part.find('-');
    try {
      if (dash == std::string::npos) {
        std::stoi(part);
        n += 1;
      } else {
        n += std::stoi(part.substr(dash + 1)) - std::stoi(part.substr(0, dash)) + 1;
      }
    } catch (const std::exception&) {
      return 0;
    }
  }
  return n;
}

struct Caches {
  int64_t l1d = 0, l2 = 0, l3 = 0;
  int64_t l2_share = 0;  // L2 bytes per core
  std::string from;
};

// Cache sizes of cpu0 from sysfs (the L2's per-core share: its size divided by the
// cores, not hardware threads, that share it), else sysconf, else 512 KiB of L2.
Caches detect_caches() {
  Caches c;
  const std::string base = "/sys/devices/system/cpu/cpu0/cache/index";
  const int smt = std::max(
      1, count_cpu_list(read_line("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list")));
  for (int i = 0; i < 16; ++i) {
    const std::string dir = base + std::to_string(i) + "/";
    const std::string level = read_line(dir + "level");
    if (level.empty()) break;
    const std::string type = read_line(dir + "type");
    const int64_t size = parse_size(read_line(dir + "size"));
    if (size <= 0) continue;
    if (level == "1" && type == "Data") c.l1d = size;
    if (level == "2" && (type == "Unified" || type == "Data")) {
      c.l2 = size;
      const int sharing = count_cpu_list(read_line(dir + "shared_cpu_list"));
      const int cores = std::max(1, sharing / smt);
      c.l2_share = size / cores;
    }
    if (level == "3" && type == "Unified") c.l3 = size;
  }
  if (c.l2 > 0) {
    c.from = "sysfs";
    return c;
  }
#ifdef _SC_LEVEL2_CACHE_SIZE
  const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
  if (l2 > 0) {
    c.l2 = c.l2_share = l2;
    const long l1 = sysconf(_SC_LEVEL1_DCACHE_SIZE), l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
    c.l1d = l1 > 0 ? l1 : 0;
    c.l3 = l3 > 0 ? l3 : 0;
    c.from = "sysconf";
    return c;
  }
#endif
  c.l2_share = 512 * 1024;
  c.from = "unknown (assumed 512 KiB of L2)";
  return c;
}

// ------------------------------------------------------------------ parsing

// `what` names the setting in errors: the environment variable or the argument.
Isa parse_isa(std::string v, const std::string& what, Isa native, bool* is_auto) {
  for (auto& ch : v) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  *is_auto = false;
  Isa isa = native;
  if (v.empty() || v == "auto" || v == "native") {
    *is_auto = true;
    return native;
  } else if (v == "scalar") {
    isa = Isa::kScalar;
  } else if (v == "avx2") {
    isa = Isa::kAvx2;
  } else if (v == "avx512") {
    isa = Isa::kAvx512;
  } else {
    SIMVQ_CHECK(false, what, "='", v, "' is not one of: auto, scalar, avx2, avx512");
  }
  SIMVQ_CHECK(cpu_supports(isa), what, "=", v, " but this CPU does not support ",
              isa == Isa::kAvx512 ? "AVX-512F" : "AVX2 with FMA",
              " (its best is ", isa_name(native), "); use auto or one of the ISAs up to ",
              isa_name(native));
  return isa;
}

constexpr int64_t kMaxTileSide = 1 << 16;
constexpr int64_t kMaxTileElems = int64_t(1) << 26;  // 256 MiB of fp32

// "auto" -> false; "<tokens>x<codes>" -> true and the sizes.
bool parse_tile(std::string v, const std::string& what, int64_t* tn, int64_t* tk) {
  for (auto& ch : v) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  if (v.empty() || v == "auto") return false;
  const auto x = v.find('x');
  bool ok = x != std::string::npos && x > 0 && x + 1 < v.size();
  long long a = 0, b = 0;
  if (ok) {
    for (size_t i = 0; i < v.size(); ++i)
      if (i != x && !std::isdigit(static_cast<unsigned char>(v[i]))) ok = false;
  }
  if (ok) {
    try {
      a = std::stoll(v.substr(0, x));
      b = std::stoll(v.substr(x + 1));
    } catch (const std::exception&) {
      ok = false;
    }
  }
  SIMVQ_CHECK(ok, what, "='", v,
              "' is not 'auto' or <tokens>x<codes> (two positive integers, e.g. 128x1024)");
  SIMVQ_CHECK(a >= 1 && b >= 1 && a <= kMaxTileSide && b <= kMaxTileSide &&
                  a * b <= kMaxTileElems,
              what, "='", v, "': each side must lie in [1, ", kMaxTileSide,
              "] and the tile hold at most ", kMaxTileElems, " values");
  *tn = a;
  *tk = b;
  return true;
}

// "auto" -> 0; else the L2 share in bytes.
int64_t parse_l2(const std::string& v0, const std::string& what) {
  std::string v = v0;
  for (auto& ch : v) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  if (v.empty() || v == "auto") return 0;
  const int64_t b = parse_size(v0);
  SIMVQ_CHECK(b >= 16 * 1024 && b <= (int64_t(1) << 30), what, "='", v0,
              "' is not 'auto' or a cache size from 16K to 1024M (e.g. 512K, 2M, 524288)");
  return b;
}

// ------------------------------------------------------------------ state

struct State {
  bool detected = false, env_applied = false;
  Isa native = Isa::kScalar, isa = Isa::kScalar;
  Caches caches;
  int64_t tile_n = 0, tile_k = 0;  // 0: chosen from the L2 share
  int64_t l2_override = 0;         // 0: detected
  std::string isa_from = "native", tile_from = "auto", l2_from;
};

std::mutex g_mutex;
State g_state;

void detect_locked() {
  if (g_state.detected) return;
  g_state.native = native_isa();
  g_state.isa = g_state.native;
  g_state.caches = detect_caches();
  g_state.l2_from = g_state.caches.from;
  g_state.detected = true;
}

void apply_isa(State& s, const std::string& v, const std::string& what, const std::string& from) {
  bool is_auto = false;
  const Isa isa = parse_isa(v, what, s.native, &is_auto);
  s.isa = isa;
  s.isa_from = is_auto ? "native" : from;
}
void apply_tile(State& s, const std::string& v, const std::string& what, const std::string& from) {
  int64_t tn = 0, tk = 0;
  if (parse_tile(v, what, &tn, &tk)) {
    s.tile_n = tn;
    s.tile_k = tk;
    s.tile_from = from;
  } else {
    s.tile_n = s.tile_k = 0;
    s.tile_from = "auto";
  }
}
void apply_l2(State& s, const std::string& v, const std::string& what, const std::string& from) {
  const int64_t b = parse_l2(v, what);
  s.l2_override = b;
  s.l2_from = b > 0 ? from : s.caches.from;
}

// Applies the environment once; on a bad value nothing is applied and the next call
// tries again (so the error repeats until the variable is fixed).
void apply_env_locked() {
  if (g_state.env_applied) return;
  State s = g_state;
  if (const char* v = std::getenv("SIMVQ_CPU_ISA")) apply_isa(s, v, "SIMVQ_CPU_ISA", "SIMVQ_CPU_ISA");
  if (const char* v = std::getenv("SIMVQ_CPU_TILE"))
    apply_tile(s, v, "SIMVQ_CPU_TILE", "SIMVQ_CPU_TILE");
  if (const char* v = std::getenv("SIMVQ_CPU_L2")) apply_l2(s, v, "SIMVQ_CPU_L2", "SIMVQ_CPU_L2");
  s.env_applied = true;
  g_state = s;
}

KernelConfig snapshot_locked() {
  const State& s = g_state;
  KernelConfig c;
  c.isa = s.isa;
  c.native = s.native;
  c.l1d = s.caches.l1d;
  c.l2 = s.caches.l2;
  c.l3 = s.caches.l3;
  c.l2_share = s.l2_override > 0 ? s.l2_override : s.caches.l2_share;
  c.isa_from = s.isa_from;
  c.l2_from = s.l2_from;
  c.caches_from = s.caches.from;
  if (s.tile_n > 0) {
    c.tile_n = s.tile_n;
    c.tile_k = s.tile_k;
    c.tile_from = s.tile_from;
  } else {
    choose_tile(c.l2_share, &c.tile_n, &c.tile_k);
    c.tile_from = "auto";
  }
  return c;
}

std::string kib(int64_t b) { return b > 0 ? std::to_string(b / 1024) + " KiB" : "unknown"; }

std::string json_string(const std::string& s) {
  std::string o = "\"";
  for (char ch : s) {
    if (ch == '"' || ch == '\\') o += '\\';
    o += ch;
  }
  return o + "\"";
}

std::string describe(const KernelConfig& c) {
  const bool blocked = c.isa != Isa::kScalar;
  std::ostringstream o;
  o << "{\"isa\": " << json_string(isa_name(c.isa))
    << ", \"native_isa\": " << json_string(isa_name(c.native))
    << ", \"isa_from\": " << json_string(c.isa_from)
    << ", \"tile_tokens\": " << c.tile_n << ", \"tile_codes\": " << c.tile_k
    << ", \"tile_fp32_bytes\": " << c.tile_n * c.tile_k * 4
    << ", \"tile_from\": " << json_string(c.tile_from)
    << ", \"l2_share_bytes\": " << c.l2_share << ", \"l2_from\": " << json_string(c.l2_from)
    << ", \"l1d_bytes\": " << c.l1d << ", \"l2_bytes\": " << c.l2 << ", \"l3_bytes\": " << c.l3
    << ", \"caches_from\": " << json_string(c.caches_from)
    << ", \"float32_path\": "
    << json_string(blocked ? std::string("float32: ") + isa_name(c.isa) +
                                 " register-blocked GEMM + argmin (" +
                                 (c.isa == Isa::kAvx512 ? "32 tokens x 14 codes" : "16 tokens x 6 codes") +
                                 " per block), no BLAS, over code tiles of a quarter of the L2 "
                                 "share of packed codes (a set tile: its codes rounded up to "
                                 "whole panels); float64: fixed-order FMA tiles of the tile below"
                           : std::string("float32 and float64: fixed-order FMA tiles + scalar "
                                         "argmin"))
    << ", \"summary\": "
    << json_string(std::string(isa_name(c.isa)) + " (native " + isa_name(c.native) + "), tile " +
                   std::to_string(c.tile_n) + " tokens x " + std::to_string(c.tile_k) +
                   " codes (" + kib(c.tile_n * c.tile_k * 4) + " of fp32; " +
                   (c.tile_from == "auto" ? "chosen for an L2 share of " + kib(c.l2_share)
                                          : "set by " + c.tile_from) +
                   "), L1d " + kib(c.l1d) + ", L2 " + kib(c.l2) + ", L3 " + kib(c.l3))
    << "}";
  return o.str();
}

std::string cpu_kernel_config_op() { return describe(config()); }

std::string set_cpu_kernel_config_op(std::optional<std::string> isa,
                                     std::optional<std::string> tile,
                                     std::optional<std::string> l2) {
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    detect_locked();
    apply_env_locked();
    State s = g_state;  // all or nothing: a bad argument changes no setting
    if (isa.has_value()) apply_isa(s, *isa, "`isa`", "set_cpu_kernel_config");
    if (tile.has_value()) apply_tile(s, *tile, "`tile`", "set_cpu_kernel_config");
    if (l2.has_value()) apply_l2(s, *l2, "`l2`", "set_cpu_kernel_config");
    g_state = s;
  }
  return cpu_kernel_config_op();
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kScalar:
      return "scalar";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kAvx512:
      return "avx512";
  }
  return "?";
}

// The fp32 tile (tokens x codes) takes at most half of the L2 share, so that the
// tile's sgemm output stays in L2 beside the code panel it is computed from until the
// argmin has read it. The token side stays at 256 (every code panel the sgemm packs is
// reused by 256 tokens: measured on a 1 MiB-L2 Zen 5 with MKL's AVX2 sgemm, 64 tokens
// x 1024 codes ran at 78-94% of the ceiling where 256 x 256 ran at 93-103%); the code
// side shrinks from 1024 to 256 first, then the token side down to 64. 2 MiB of L2 ->
// 256 x 1024 (1 MiB), 1 MiB -> 256 x 512, 512 KiB -> 256 x 256, 256 KiB -> 128 x 256.
void choose_tile(int64_t l2_share, int64_t* tile_n, int64_t* tile_k) {
  const int64_t elems = l2_share / 2 / 4;
  int64_t tn = 256, tk = 1024;
  while (tk > 256 && tn * tk > elems) tk /= 2;
  while (tn > 64 && tn * tk > elems) tn /= 2;
  *tile_n = tn;
  *tile_k = tk;
}

KernelConfig config() {
  std::lock_guard<std::mutex> lock(g_mutex);
  detect_locked();
  apply_env_locked();
  return snapshot_locked();
}

}  // namespace cpu
}  // namespace simvq

// No tensor arguments: registered as plain (catch-all) kernels, callable without a device.
TORCH_LIBRARY_FRAGMENT(simvq, m) {
  // The CPU kernel's configuration in effect, as JSON text (ISA, tile, caches).
  m.def("cpu_kernel_config() -> str", &simvq::cpu::cpu_kernel_config_op);
  // Changes the configuration for this process (same values as SIMVQ_CPU_ISA,
  // SIMVQ_CPU_TILE, SIMVQ_CPU_L2; None leaves a setting as it is) and returns it.
  m.def("set_cpu_kernel_config(str? isa=None, str? tile=None, str? l2=None) -> str",
        &simvq::cpu::set_cpu_kernel_config_op);
}
