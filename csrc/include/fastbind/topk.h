#pragma once
// The per-row top-k of the codebook lookup (DESIGN §2.4), shared by the CPU and CUDA kernels: a
// list of the k smallest scores seen so far, sorted ascending, with their column indices.
//
// Ties go to the lowest index, as torch.argmin / a stable sort: columns are offered in increasing
// index order, and an equal score stays behind the entries already in the list. NaN never wins a
// comparison: a NaN score is never inserted (a NaN code never displaces a real candidate; slots
// that no finite score reached keep +inf and index -1, filled by the caller).
#include "fastbind/epilogue.h"

namespace fastbind {

// Empty list: k entries (+inf, -1).
template <class Index>
FB_HD void topk_init(float* score, Index* index, int k) {
  for (int s = 0; s < k; ++s) {
    score[s] = fb_inf();
    index[s] = Index(-1);
  }
}

// Inserts (value, j) into the sorted list score[0..k) / index[0..k), dropping its last entry. The
// caller has checked value < score[k − 1] (so NaN never gets here).
template <class Index>
FB_HD void topk_insert(float* score, Index* index, int k, float value, Index j) {
  int p = k - 1;
  while (p > 0 && score[p - 1] > value) {
    score[p] = score[p - 1];
    index[p] = index[p - 1];
    --p;
  }
  score[p] = value;
  index[p] = j;
}

// Offers (value, j): inserted when it beats the current k-th best (never for NaN). Returns whether
// it was inserted.
template <class Index>
FB_HD bool topk_push(float* score, Index* index, int k, float value, Index j) {
  if (!(value < score[k - 1])) return false;
  topk_insert(score, index, k, value, j);
  return true;
}

// Sorts k (distance, index) pairs by distance, then index: insertion sort, which needs no strict
// weak order and so stays well defined with NaN distances (a NaN stays where it is relative to the
// entries before it). Used to re-rank the winners by their exact distances.
template <class Dist, class Index>
FB_HD void sort_by_distance_then_index(Dist* dist, Index* index, int k) {
  for (int s = 1; s < k; ++s) {
    const Dist dv = dist[s];
    const Index iv = index[s];
    int p = s;
    while (p > 0 && (dist[p - 1] > dv || (dist[p - 1] == dv && index[p - 1] > iv))) {
      dist[p] = dist[p - 1];
      index[p] = index[p - 1];
      --p;
    }
    dist[p] = dv;
    index[p] = iv;
  }
}

}  // namespace fastbind
