// simvq-kernels: the CUDA kernels' index arithmetic and launch planning as plain
// functions, shared by the kernels (device), the launchers (host) and a CPU test
// (tests/test_cuda_plan.py compiles this header with the host compiler): no CUDA, no
// torch headers here.
//
// - Shared-memory tile layout: a tile is 128 rows x 16 32-bit words (64 bytes of the
//   reduction dimension per row), rows unpadded, with the 4 16-byte segments of a row
//   permuted by an XOR swizzle so that the 8 rows read by one ldmatrix phase, and the
//   8 segments written by one quarter-warp of cp.async, fall on 8 distinct groups of 4
//   banks (conflict-free), and so that the backward kernel's 32-bit transposed stores
//   by a warp hit 32 distinct banks.
// - Fragment addresses for ldmatrix.x4 (mma.sync m16n8k16 bf16/fp16 and m16n8k8 tf32
//   read the same words: lane l gets row l/4, word l%4 of each 8 x 4-word matrix).
// - The search's grid: how many code splits give whole waves of blocks.
// - The search's shared-memory plan: how much of the token tile stays resident.
// - The backward's column-tile count.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SIMVQ_HD __host__ __device__ __forceinline__
#else
#define SIMVQ_HD inline
#endif

namespace simvq {
namespace cuda {
namespace plan {

// ---------------------------------------------------------------- tile layout

constexpr int kRows = 128;                  // rows of a tile (tokens, codes, or d / r)
constexpr int kRowWords = 16;               // 64 bytes of the reduction dimension
constexpr int kSegWords = 4;                // a 16-byte segment
constexpr int kSegs = kRowWords / kSegWords;
constexpr int kTileWords = kRows * kRowWords;  // 2048 words = 8 KiB
constexpr int kTileBytes = kTileWords * 4;

// Physical segment of logical segment `seg` in row `row`: rows 2i and 2i+1 share one
// 128-byte line of banks (each row is half of it); the XOR by (row / 2) % 4 gives the 4
// row pairs of an aligned group of 8 rows 4 different segment orders, so one logical
// segment of 8 consecutive rows covers all 8 bank groups.
SIMVQ_HD int swizzle_seg(int row, int seg) { return seg ^ ((row >> 1) & (kSegs - 1)); }

// Word offset (from the tile start) of the first word of a logical segment.
SIMVQ_HD int seg_offset(int row, int seg) {
  return row * kRowWords + swizzle_seg(row, seg) * kSegWords;
}

// Word offset of logical word `word` (0..15) of row `row`.
SIMVQ_HD int word_offset(int row, int word) {
  return seg_offset(row, word / kSegWords) + word % kSegWords;
}

// cp.async: piece q (0..511) of a tile is row q / 4, logical segment q % 4; thread tid
// of 256 copies pieces tid and tid + 256.
SIMVQ_HD int copy_row(int q) { return q >> 2; }
SIMVQ_HD int copy_seg(int q) { return q & 3; }

// ldmatrix.x4 for the A operand (16 rows x 16 words at rows row0.., words 8 ks..):
// lanes 8i..8i+7 give the row addresses of matrix i: matrix 0 rows 0-7 / low 4 words,
// 1 rows 8-15 / low, 2 rows 0-7 / high, 3 rows 8-15 / high; registers 0..3 are then the
// fragment's a0..a3 (row g / g+8, k low / high) for both mma shapes.
SIMVQ_HD int ldsm_a_row(int row0, int lane) { return row0 + (lane & 7) + ((lane >> 3) & 1) * 8; }
SIMVQ_HD int ldsm_a_seg(int ks, int lane) { return 2 * ks + (lane >> 4); }

// ldmatrix.x4 for two B fragments (rows n0..n0+15 = two 8-row n fragments): matrix 0
// rows 0-7 / low, 1 rows 0-7 / high, 2 rows 8-15 / low, 3 rows 8-15 / high; registers
// 0..3 are b[0][0], b[0][1], b[1][0], b[1][1].
SIMVQ_HD int ldsm_b_row(int n0, int lane) { return n0 + (lane & 7) + (lane >> 4) * 8; }
SIMVQ_HD int ldsm_b_seg(int ks, int lane) { return 2 * ks + ((lane >> 3) & 1); }

// The backward kernel stages transposed tiles through registers (tokens become the
// words): thread (warp w, lane l) holds word backward_word(w, l) (the same for all e)
// of rows backward_row(w, l, e), e = 0..7. A warp's store for one e covers 8
// consecutive rows x one logical segment: 32 distinct banks.
SIMVQ_HD int backward_word(int warp, int lane) { return (warp & 3) * kSegWords + (lane >> 3); }
SIMVQ_HD int backward_row(int warp, int lane, int e) {
  return (warp >> 2) * 8 + 16 * e + (lane & 7);
}

// The backward's bias sum reads, per thread, logical segments 2h and 2h+1 of row
// tid % 128 (h = tid / 128) as two 16-byte loads.
SIMVQ_HD int bias_row(int tid) { return tid & (kRows - 1); }
SIMVQ_HD int bias_seg(int tid, int i) { return 2 * (tid >> 7) + i; }

// ---------------------------------------------------------------- search grid

struct SplitPlan {
  int64_t splits;  // blocks along the codes
  int64_t per;     // codes per split (a multiple of the tile)
};

// A block's fixed cost (token tile load, prologue, epilogue), in units of one code tile.
constexpr int64_t kBlockOverheadTiles = 1;
// Split counts tried: up to about this many waves of blocks (more splits only add
// overhead), and at least up to kMinSplitsTried (a large N can still gain from
// evening out its last wave).
constexpr int64_t kMaxWaves = 8;
constexpr int64_t kMinSplitsTried = 4;
constexpr int64_t kMaxGridY = 65535;

// Estimated time of a split choice in code-tile units: blocks run in waves of `slots`
// (all blocks of a split plan do about the same work), each wave lasting the largest
// block's code tiles plus the fixed cost.
SIMVQ_HD int64_t split_cost(int64_t tiles_m, int64_t tiles_k, int64_t slots, int64_t splits) {
  const int64_t per_tiles = (tiles_k + splits - 1) / splits;
  const int64_t used = (tiles_k + per_tiles - 1) / per_tiles;
  const int64_t waves = (tiles_m * used + slots - 1) / slots;
  return waves * (per_tiles + kBlockOverheadTiles);
}

// How to split K codes over blocks when N tokens make tiles_m = ceil(N / tile) token
// tiles and the GPU runs `slots` = SMs x blocks-per-SM blocks at once: the split count
// with the least estimated time (split_cost), the fewest blocks among equals. So the
// grid is a whole number of waves, or close to it, whenever the work allows: e.g. on
// 132 SMs x 2, N = 16384, K = 262144 runs 256 blocks (one wave) where ceil(264 / 128)
// = 3 splits made 384 (1.45 waves). The result does not change what the search
// returns (the splits merge by (value, index)).
SIMVQ_HD SplitPlan plan_code_splits(int64_t slots, int64_t N, int64_t K, int64_t tile) {
  const int64_t tiles_m = N > 0 ? (N + tile - 1) / tile : 1;
  const int64_t tiles_k = (K + tile - 1) / tile;
  if (tiles_k <= 1) return {1, tiles_k > 0 ? tiles_k * tile : tile};
  if (slots < 1) slots = 1;
  int64_t limit = (kMaxWaves * slots + tiles_m - 1) / tiles_m;
  if (limit < kMinSplitsTried) limit = kMinSplitsTried;
  if (limit > tiles_k) limit = tiles_k;
  if (limit > kMaxGridY) limit = kMaxGridY;
  if (limit < 1) limit = 1;
  int64_t best_s = 1, best_cost = split_cost(tiles_m, tiles_k, slots, 1), best_blocks = tiles_m;
  for (int64_t s = 2; s <= limit; ++s) {
    const int64_t per_tiles = (tiles_k + s - 1) / s;
    const int64_t used = (tiles_k + per_tiles - 1) / per_tiles;
    if (used != s) continue;  // the same plan as a smaller s
    const int64_t cost = split_cost(tiles_m, tiles_k, slots, s);
    const int64_t blocks = tiles_m * s;
    if (cost < best_cost || (cost == best_cost && blocks < best_blocks)) {
      best_s = s;
      best_cost = cost;
      best_blocks = blocks;
    }
  }
  const int64_t per_tiles = (tiles_k + best_s - 1) / best_s;
  return {(tiles_k + per_tiles - 1) / per_tiles, per_tiles * tile};
}

// ---------------------------------------------------------------- search shared memory

// The search block keeps chunks [0, resident) of its 128 x d token tile in shared memory
// for its whole life (loaded once) and streams the codes (and any token chunks beyond
// `resident`) through 2 stages. With every chunk resident a stage holds a code tile
// only (8 KiB); otherwise a code tile and a token tile (16 KiB).
struct SearchSmem {
  int64_t resident;  // token chunks resident in shared memory
  bool stream_a;     // token chunks >= resident are streamed with the codes
  int64_t bytes;     // dynamic shared memory per block
};

constexpr int kStages = 2;

SIMVQ_HD int64_t search_smem_bytes(int64_t resident, bool stream_a) {
  return (resident + int64_t(kStages) * (stream_a ? 2 : 1)) * kTileBytes;
}

// The plan for a width of `chunks` 64-byte chunks under `budget` bytes of shared memory
// per block: everything resident when it fits, else as many chunks as fit next to the
// 2 x 16 KiB stages (at least 0: 32 KiB, which every sm_80+ GPU has).
SIMVQ_HD SearchSmem plan_search_smem(int64_t chunks, int64_t budget) {
  const int64_t whole = search_smem_bytes(chunks, false);
  if (whole <= budget) return {chunks, false, whole};
  int64_t r = (budget - search_smem_bytes(0, true)) / kTileBytes;
  if (r < 0) r = 0;
  if (r > chunks - 1) r = chunks - 1;
  return {r, true, search_smem_bytes(r, true)};
}

// Shared memory a block may use so that `blocks_per_sm` blocks fit on an SM: the SM's
// shared memory divided between them (less the per-block reservation), and no more
// than one block may have.
SIMVQ_HD int64_t smem_budget(int64_t per_sm, int64_t per_block_optin, int64_t reserved_per_block,
                             int64_t blocks_per_sm) {
  int64_t b = per_sm / (blocks_per_sm > 0 ? blocks_per_sm : 1) - reserved_per_block;
  return b < per_block_optin ? b : per_block_optin;
}

// ---------------------------------------------------------------- backward

// Column tiles (of 128) of the backward product dW = g^T B[idx], d x r: the bias
// gradient is a column sum of g done beside the products (no extra column), so r = 128
// is one tile. At least one tile, which also carries the bias when r = 0.
SIMVQ_HD int64_t backward_col_tiles(int64_t r) { return r > 0 ? (r + kRows - 1) / kRows : 1; }

}  // namespace plan
}  // namespace cuda
}  // namespace simvq
