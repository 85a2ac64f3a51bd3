// Evaluates the CUDA kernels' index arithmetic and launch plans (csrc/cuda/plan.h, the
// same header the kernels and launchers include) on the host, for tests/test_cuda_plan.py.
// Reads commands from stdin, one per line, and answers each with one line:
//   splits SLOTS N K TILE           -> "SPLITS PER"
//   cost SLOTS N K TILE S           -> "COST" (split_cost of S splits, in code tiles)
//   smem CHUNKS BUDGET              -> "RESIDENT STREAM_A BYTES"
//   budget PER_SM OPTIN RESERVED BPS -> "BYTES"
//   coltiles R                      -> "TILES"
//   layout NAME                     -> "W ADDR_0 ... ADDR_31" per warp request, then "end"
//                                      (W: bytes per lane; ADDR: word offsets)
//   word ROW WORD                   -> "OFFSET" (word_offset)
#include <cstdint>
#include <iostream>
#include <sstream>
#include <string>

#include "plan.h"

using namespace simvq::cuda::plan;

static void request(int width, const int (&addr)[32]) {
  std::cout << width;
  for (int a : addr) std::cout << ' ' << a;
  std::cout << '\n';
}

static void layout(const std::string& name) {
  int addr[32];
  if (name == "cp_async") {  // load_tile_async: thread tid copies pieces tid, tid + 256
    for (int h = 0; h < 2; ++h)
      for (int w = 0; w < 8; ++w) {
        for (int l = 0; l < 32; ++l) {
          const int q = w * 32 + l + h * 256;
          addr[l] = seg_offset(copy_row(q), copy_seg(q));
        }
        request(16, addr);
      }
  } else if (name == "ldsm_a") {  // mma_chunk, A operand: warp rows wm * 64 + mf * 16
    for (int wm = 0; wm < 2; ++wm)
      for (int mf = 0; mf < 4; ++mf)
        for (int ks = 0; ks < 2; ++ks) {
          for (int l = 0; l < 32; ++l)
            addr[l] = seg_offset(ldsm_a_row(wm * 64 + mf * 16, l), ldsm_a_seg(ks, l));
          request(16, addr);
        }
  } else if (name == "ldsm_b") {  // mma_chunk, B operand: warp cols wn * 32 + np * 16
    for (int wn = 0; wn < 4; ++wn)
      for (int np = 0; np < 2; ++np)
        for (int ks = 0; ks < 2; ++ks) {
          for (int l = 0; l < 32; ++l)
            addr[l] = seg_offset(ldsm_b_row(wn * 32 + np * 16, l), ldsm_b_seg(ks, l));
          request(16, addr);
        }
  } else if (name == "backward_store") {  // backward_kernel's store(): 32-bit words
    for (int w = 0; w < 8; ++w)
      for (int e = 0; e < 8; ++e) {
        for (int l = 0; l < 32; ++l)
          addr[l] = word_offset(backward_row(w, l, e), backward_word(w, l));
        request(4, addr);
      }
  } else if (name == "bias_load") {  // backward_kernel's bias_add(): 16-byte loads
    for (int w = 0; w < 8; ++w)
      for (int i = 0; i < 2; ++i) {
        for (int l = 0; l < 32; ++l) {
          const int tid = w * 32 + l;
          addr[l] = seg_offset(bias_row(tid), bias_seg(tid, i));
        }
        request(16, addr);
      }
  }
  std::cout << "end\n";
}

int main() {
  std::string line;
  while (std::getline(std::cin, line)) {
    std::istringstream in(line);
    std::string cmd;
    in >> cmd;
    if (cmd == "splits") {
      int64_t slots, n, k, tile;
      in >> slots >> n >> k >> tile;
      const SplitPlan p = plan_code_splits(slots, n, k, tile);
      std::cout << p.splits << ' ' << p.per << '\n';
    } else if (cmd == "cost") {
      int64_t slots, n, k, tile, sp;
      in >> slots >> n >> k >> tile >> sp;
      std::cout << split_cost((n + tile - 1) / tile, (k + tile - 1) / tile, slots, sp) << '\n';
    } else if (cmd == "smem") {
      int64_t chunks, budget;
      in >> chunks >> budget;
      const SearchSmem s = plan_search_smem(chunks, budget);
      std::cout << s.resident << ' ' << int(s.stream_a) << ' ' << s.bytes << '\n';
    } else if (cmd == "budget") {
      int64_t per_sm, optin, reserved, bps;
      in >> per_sm >> optin >> reserved >> bps;
      std::cout << smem_budget(per_sm, optin, reserved, bps) << '\n';
    } else if (cmd == "coltiles") {
      int64_t r;
      in >> r;
      std::cout << backward_col_tiles(r) << '\n';
    } else if (cmd == "layout") {
      std::string name;
      in >> name;
      layout(name);
    } else if (cmd == "word") {
      int row, word;
      in >> row >> word;
      std::cout << word_offset(row, word) << '\n';
    } else {
      std::cout << "unknown\n";
    }
    std::cout.flush();
  }
  return 0;
}
