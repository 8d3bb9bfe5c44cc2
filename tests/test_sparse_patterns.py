"""Tests of the block-sparse pattern estimators (kernels/attention/sparse_patterns.py) against slow references
written from the papers with loops over query rows, groups and blocks: XAttention (arXiv 2503.16428: antidiagonal
scores of stride x stride tiles, softmax over key groups, block sums, threshold selection with sink and diagonal
kept) and MInference's vertical-slash pattern (arXiv 2407.02490: last-query estimate, top vertical columns and
slash diagonals, first columns and nearest diagonals forced), and the static window pattern against model/masks.py's
element rule reduced per block. Tiny CPU shapes, awkward lengths, GQA, chunks of queries after a cache (Lq < Lk).
"""
from __future__ import annotations

import math

import pytest
import torch

from kernels.attention.sparse_patterns import (block_density, vertical_slash_mask, window_mask,
                                               xattention_mask)
from model.masks import AttentionMask


def _qk(B, lq, lk, hq, hkv, d=8):
    return torch.randn(B, lq, hq, d), torch.randn(B, lk, hkv, d)


def _pair_visible(p, j, causal):
    return (not causal) or j <= p


def _block_sets(lq, lk, bm, bn, causal):
    """Per (m, n): any visible pair, and the diagonal (key block holding one of the block's own query positions)."""
    nm, nn = math.ceil(lq / bm), math.ceil(lk / bn)
    vis = torch.zeros(nm, nn, dtype=torch.bool)
    diag = torch.zeros(nm, nn, dtype=torch.bool)
    for i in range(lq):
        p = lk - lq + i
        if 0 <= p < lk:
            diag[i // bm, p // bn] = True
        for j in range(lk):
            if _pair_visible(p, j, causal):
                vis[i // bm, j // bn] = True
    return vis, diag


def _xattention_ref(q, k, bm, bn, S, thr, causal):
    B, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    nm, nn = math.ceil(lq / bm), math.ceil(lk / bn)
    ngq, ngk = nm * bm // S, nn * bn // S
    vis, diag = _block_sets(lq, lk, bm, bn, causal)
    forced = (diag | (torch.arange(nn) < 1)[None, :]) & vis
    out = torch.zeros(B, hq, nm, nn, dtype=torch.bool)
    for b in range(B):
        for h in range(hq):
            kh = h // (hq // hkv)
            score = torch.full((ngq, ngk), float("-inf"))
            for g in range(ngq):
                last_q = min(g * S + S - 1, lq - 1) + lk - lq
                for c in range(ngk):
                    if c * S >= lk or (causal and c * S > last_q):
                        continue
                    tot = 0.0
                    for j in range(S):  # antidiagonal: query row S-1-j of the tile against key column j
                        qi, kj = g * S + S - 1 - j, c * S + j
                        if qi < lq and kj < lk:
                            tot += float(q[b, qi, h] @ k[b, kj, kh])
                    score[g, c] = tot / S / math.sqrt(d)
            blocks = torch.zeros(nm, nn, dtype=torch.float64)
            for g in range(ngq):
                if g * S >= lq or torch.isinf(score[g]).all():
                    continue
                prob = torch.softmax(score[g].double(), 0)
                for c in range(ngk):
                    blocks[g * S // bm, c * S // bn] += prob[c]
            for m in range(nm):
                row = blocks[m]
                kept = float(row[forced[m]].sum())
                sel = forced[m].clone()
                for n in sorted((n for n in range(nn) if not forced[m, n]), key=lambda n: -float(row[n])):
                    if kept < thr * float(row.sum()):
                        sel[n] = True
                        kept += float(row[n])
                    else:
                        break
                out[b, h, m] = (sel | forced[m]) & vis[m]
    return out


XA_CASES = {  # B, Lq, Lk, Hq, Hkv, (bm, bn), stride, threshold, causal
    "causal-ragged-gqa2": (1, 45, 45, 4, 2, (8, 8), 4, 0.9, True),
    "lq<lk-b16x8": (2, 21, 60, 2, 1, (16, 8), 4, 0.8, True),
    "noncausal": (1, 30, 30, 2, 2, (8, 8), 4, 0.6, False),
}


@pytest.mark.parametrize("case", list(XA_CASES), ids=list(XA_CASES))
def test_xattention_against_reference(case):
    B, lq, lk, hq, hkv, bs, S, thr, causal = XA_CASES[case]
    q, k = _qk(B, lq, lk, hq, hkv)
    got = xattention_mask(q, k, bs, stride=S, threshold=thr, causal=causal)
    want = _xattention_ref(q, k, *bs, S, thr, causal)
    assert torch.equal(got, want), f"{(got != want).sum()} blocks differ"


def test_xattention_chunked_equals_one_pass():
    q, k = _qk(1, 70, 70, 2, 1)
    one = xattention_mask(q, k, (16, 16), stride=4, threshold=0.9)
    assert torch.equal(xattention_mask(q, k, (16, 16), stride=4, threshold=0.9, chunk_q=16), one)


def test_threshold_one_keeps_every_visible_block():
    q, k = _qk(1, 40, 40, 2, 2)
    m = xattention_mask(q, k, (16, 16), stride=4, threshold=1.0)
    assert block_density(m, 40, 40, (16, 16)) == 1.0


def _vertical_slash_ref(q, k, b, last_q, v_size, s_size, init_cols, local, causal):
    B, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    nm, nn = math.ceil(lq / b), math.ceil(lk / b)
    vis, diag = _block_sets(lq, lk, b, b, causal)
    out = torch.zeros(B, hq, nm, nn, dtype=torch.bool)
    n = min(last_q, lq)
    for bi in range(B):
        for h in range(hq):
            kh = h // (hq // hkv)
            vert = torch.zeros(lk, dtype=torch.float64)
            slash = {}
            for i in range(lq - n, lq):
                p = lk - lq + i
                keys = [j for j in range(lk) if _pair_visible(p, j, causal)]
                if not keys:
                    continue
                prob = torch.softmax(torch.stack([q[bi, i, h] @ k[bi, j, kh] for j in keys]) / math.sqrt(d), 0)
                for j, pj in zip(keys, prob.tolist()):
                    vert[j] += pj
                    slash[p - j] = slash.get(p - j, 0.0) + pj
            vert[:init_cols] = float("inf")
            for o in range(-lk, lk):
                if abs(o) < local:
                    slash[o] = float("inf")
            cols = sorted(range(lk), key=lambda j: -float(vert[j]))[:v_size]
            cols = [j for j in cols if vert[j] > 0]
            offs = sorted(slash, key=lambda o: -slash[o])[:s_size]
            offs = [o for o in offs if slash[o] > 0]
            sel = torch.zeros(nm, nn, dtype=torch.bool)
            for i in range(lq):  # every query row: the key blocks its kept columns and diagonals touch
                p = lk - lq + i
                for j in cols:
                    sel[i // b, j // b] = True
                for o in offs:
                    if 0 <= p - o < lk:
                        sel[i // b, (p - o) // b] = True
            sel[:, 0] = True
            out[bi, h] = (sel | diag) & vis
    return out


VS_CASES = {  # B, Lq, Lk, Hq, Hkv, b, last_q, vertical, slash, init columns, local diagonals, causal
    "causal-ragged-gqa2": (1, 53, 53, 4, 2, 8, 16, 6, 5, 2, 3, True),
    "lq<lk-gqa4": (2, 19, 70, 4, 1, 16, 8, 5, 4, 3, 2, True),
    "noncausal": (1, 27, 27, 2, 2, 8, 8, 4, 6, 1, 2, False),
}


@pytest.mark.parametrize("case", list(VS_CASES), ids=list(VS_CASES))
def test_vertical_slash_against_reference(case):
    B, lq, lk, hq, hkv, b, nq, vsz, ssz, init, local, causal = VS_CASES[case]
    q, k = _qk(B, lq, lk, hq, hkv)
    got = vertical_slash_mask(q, k, (b, b), last_q=nq, vertical_size=vsz, slash_size=ssz, init_columns=init,
                              local_diagonals=local, causal=causal)
    want = _vertical_slash_ref(q, k, b, nq, vsz, ssz, init, local, causal)
    assert torch.equal(got, want), f"{(got != want).sum()} blocks differ"


def test_vertical_slash_per_head_budgets():
    q, k = _qk(1, 64, 64, 2, 1)
    small = vertical_slash_mask(q, k, (8, 8), last_q=8, vertical_size=[1, 30], slash_size=[1, 30],
                                init_columns=1, local_diagonals=1)
    assert small[0, 0].sum() < small[0, 1].sum()  # the head with the larger budget keeps more


@pytest.mark.parametrize("lq, lk, window, num_global, causal", [(45, 45, 10, 3, True), (21, 70, 20, 0, True),
                                                                (33, 33, 9, 5, False)],
                         ids=["causal", "lq<lk", "noncausal"])
def test_window_against_element_rule(lq, lk, window, num_global, causal):
    q, k = _qk(1, lq, lk, 2, 1)
    got = window_mask(q, k, (8, 8), window=window, num_global=num_global, causal=causal)
    dense = AttentionMask(causal=causal, window=window, num_global=num_global).dense(lq, lk)
    nm, nn = math.ceil(lq / 8), math.ceil(lk / 8)
    want = torch.zeros(nm, nn, dtype=torch.bool)
    for i in range(lq):
        for j in range(lk):
            want[i // 8, j // 8] |= bool(dense[i, j])
    vis, diag = _block_sets(lq, lk, 8, 8, causal)
    want = (want | diag | (torch.arange(nn) < 1)[None, :]) & vis
    assert torch.equal(got[0, 0], want) and torch.equal(got[0, 1], want)
