import math

import pytest
import torch

from llmdiff.compare import kernels as K
from llmdiff.compare import metrics as M
from llmdiff.compare.tolerance import Tolerance, lower_precision, parse_thresholds
from llmdiff.errors import UsageError


def pair(a, b, rtol=0.0, atol=0.0):
    return K.pair_stats(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), rtol, atol)


def test_basic_metrics():
    p = pair([3.0, 4.0], [3.0, 4.5])
    assert M.rel_l2(p) == pytest.approx(0.5 / 5.0)
    assert M.sqnr_db(p) == pytest.approx(20 * math.log10(10))
    assert M.max_abs(p) == pytest.approx(0.5)
    assert M.mean_abs(p) == pytest.approx(0.25)
    assert M.cosine(p) == pytest.approx((9 + 18) / (5 * math.hypot(3, 4.5)))
    assert M.max_rel(p) == pytest.approx(0.5 / 4.0)
    assert M.TENSOR_METRICS["frac_rel_gt_1e-3"](p) == 0.5
    assert M.mismatches(pair([3.0, 4.0], [3.0, 4.5], rtol=0.1)) == 1
    assert M.mismatches(pair([3.0, 4.0], [3.0, 4.5], rtol=0.2)) == 0


def test_equal_and_zero_tensors():
    p = pair([0.0, 0.0], [0.0, 0.0])
    assert (M.cosine(p), M.rel_l2(p), M.sqnr_db(p)) == (1.0, 0.0, math.inf)
    q = pair([0.0, 0.0], [0.0, 1e-3])
    assert M.rel_l2(q) == math.inf and M.cosine(q) == 0.0


def test_relative_error_floor_near_zero():
    # a golden element ~0 is judged against 1e-3 of the tensor's rms instead of exploding
    p = pair([1.0, 1e-12, -1.0], [1.0, 1e-6, -1.0])
    rms = math.sqrt(2 / 3)
    assert M.max_rel(p) == pytest.approx((1e-6 - 1e-12) / (1e-3 * rms), rel=1e-9)


def test_nonfinite_positions():
    nan, inf = float("nan"), float("inf")
    same = pair([1.0, nan, inf, 2.0], [1.0, nan, inf, 2.0])
    assert same.nonfinite_mismatch == 0 and M.rel_l2(same) == 0.0
    differ = pair([1.0, 2.0, inf, 2.0], [1.0, nan, -inf, 2.0], rtol=0.1, atol=0.1)
    assert differ.nonfinite_mismatch == 2
    ok, reason = Tolerance().judge({"rel_l2": 0.0, "nonfinite_mismatch": 2}, "float32")
    assert not ok and reason == "2 positions NaN/Inf on one side only"
    assert M.mismatches(differ) == 2


def test_kl_is_per_position_over_the_vocabulary():
    g = torch.tensor([[[0.0, 0.0, 0.0], [5.0, 0.0, 0.0]]])
    t = torch.tensor([[[0.0, 0.0, 0.0], [0.0, 5.0, 0.0]]])
    kl = K.kl_per_position(g, t)
    assert kl.shape == (2,)
    assert kl[0] == pytest.approx(0.0, abs=1e-12)
    p = torch.softmax(torch.tensor([5.0, 0.0, 0.0], dtype=torch.float64), 0)
    q = torch.softmax(torch.tensor([0.0, 5.0, 0.0], dtype=torch.float64), 0)
    assert kl[1] == pytest.approx(float((p * (p / q).log()).sum()))
    summary = K.logits_metrics(g, t)
    assert summary["top1_agree"] == 0.5 and summary["golden_token"] == 0 and summary["target_token"] == 1
    assert summary["golden_margin"] == pytest.approx(5.0)


def test_bf16_inputs_are_upcast_and_large_tensors_stream_in_chunks(monkeypatch):
    g = torch.tensor([1.0, 2.0, 3.0])
    assert M.rel_l2(K.pair_stats(g, g.to(torch.bfloat16))) == 0.0
    torch.manual_seed(0)
    big_g = torch.randn(10_000)
    big_t = big_g + 1e-3 * torch.randn(10_000)
    whole = K.pair_stats(big_g, big_t, rtol=1e-3, atol=1e-4)
    monkeypatch.setattr(K, "CHUNK", 777)
    chunked = K.pair_stats(big_g, big_t, rtol=1e-3, atol=1e-4)
    for name, metric in M.TENSOR_METRICS.items():
        assert metric(chunked) == pytest.approx(metric(whole), rel=1e-9), name
    assert chunked.mismatches == whole.mismatches


def test_lower_precision_and_budgets():
    assert lower_precision("float32", "bfloat16") == "bfloat16"
    assert lower_precision("float16", "float32") == "float16"
    assert lower_precision("int64", "int64") == "float64"
    assert Tolerance().judge({"rel_l2": 0.2}, "bfloat16") == (True, "")
    assert Tolerance().judge({"rel_l2": 0.2}, "float32") == (False, "rel_l2 0.2 > 0.0001 (float32 budget)")


def test_allclose_and_thresholds_override():
    tol = Tolerance(rtol=1e-3, atol=1e-5)
    assert tol.judge({"rel_l2": 0.5, "mismatches": 0}, "float32") == (True, "")
    assert tol.judge({"rel_l2": 0.0, "mismatches": 3}, "float32") == (False, "3 elements outside rtol=0.001 atol=1e-05")
    tol = Tolerance(thresholds=parse_thresholds(["cosine=0.999", "max_abs=0.1"]))
    assert tol.judge({"cosine": 0.9995, "max_abs": 0.05, "rel_l2": 9.0}, "float32") == (True, "")
    assert tol.judge({"cosine": 0.99, "max_abs": 0.05}, "float32") == (False, "cosine 0.99 < 0.999")
    with pytest.raises(UsageError, match="expected NAME=VALUE"):
        parse_thresholds(["cosine"])


@pytest.mark.parametrize("block", [None, 300])
def test_batched_pair_stats_equal_one_by_one(block, monkeypatch):
    """Small pairs are measured together in the compare engine: every statistic must equal the reference's,
    whether a group is measured at once or in blocks of rows."""
    if block is not None:
        monkeypatch.setattr(K, "GROUP_BLOCK", block)
    torch.manual_seed(0)
    shapes = [(1, 6, 64), (64,), (1, 1, 128), (3, 4, 5), (1,), (2, 2), (1, 6, 16), (0,), (7,)]
    pairs = []
    for k in range(120):
        shape = shapes[k % len(shapes)]
        g = torch.randn(shape) * 10.0 ** (k % 5 - 2)
        t = (g + 1e-3 * torch.randn(shape)).to([torch.float32, torch.bfloat16, torch.float16][k % 3])
        if k == 7:
            g, t = torch.zeros(shape), torch.zeros(shape)
        if k == 11:  # NaN on one side: measured alone
            t = t.clone()
            t.view(-1)[0] = float("nan")
        if k == 17:  # a value whose square overflows float32: measured alone, in float64
            g = g.clone()
            g.view(-1)[0] = -3.4e38
        if k == 19:
            g, t = torch.zeros(3, 4), torch.ones(3, 4)
        pairs.append((g, t, 1e-3 * (k % 2), 1e-5))
    for i, (one, batched) in enumerate(zip([K.reference_pair_stats(*p) for p in pairs], K.pair_stats_batch(pairs),
                                                strict=True)):
        for name in ("n", "gg", "tt", "gt", "dd", "max_abs", "sum_abs", "max_rel", "mismatches",
                     "nonfinite_mismatch", "worst_row_rel_l2", "rel_above"):
            a, b = getattr(one, name), getattr(batched, name)
            assert a == b or (isinstance(a, float) and math.isclose(a, b, rel_tol=1e-9)), (i, name, a, b)


def test_fused_pair_stats_equal_the_reference_path(monkeypatch):
    """Large pairs are measured by fused torch reductions over cache-sized chunks: every statistic must
    equal the NumPy reference path's (up to float32 summation order), and pairs it cannot take fall back."""
    torch.manual_seed(0)
    cases = [torch.randn(1, 300, 576), torch.randn(2, 7, 1000) * 1e-20, torch.randn(200_000, dtype=torch.float64),
             torch.randn(40_000) + 100.0, torch.zeros(3, 5000), torch.randn(1, 3, 49152)]
    monkeypatch.setattr(K, "FUSED_CHUNK", 20_000)  # several chunks, rows kept whole
    for k, g in enumerate(cases):
        for t in ((g + 1e-3 * torch.randn_like(g)).to(torch.bfloat16), g + 1e-6 * torch.randn_like(g), g.clone()):
            for rtol, atol in ((0.0, 0.0), (1e-3, 1e-5)):
                fused, ref = K.fused_pair_stats(g, t, rtol, atol), K.reference_pair_stats(g, t, rtol, atol)
                assert fused is not None
                for name in ("n", "gg", "tt", "gt", "dd", "max_abs", "sum_abs", "max_rel", "worst_row_rel_l2"):
                    a, b = getattr(ref, name), getattr(fused, name)
                    assert math.isclose(a, b, rel_tol=2e-5, abs_tol=1e-300), (k, name, a, b)
                # counts of values at a threshold may differ by the few that float32 rounding moves across it
                assert abs(fused.mismatches - ref.mismatches) <= max(2, 1e-5 * g.numel()), k
                for thr in M.REL_THRESHOLDS:
                    assert abs(fused.rel_above[thr] - ref.rel_above[thr]) <= max(2, 1e-5 * g.numel()), (k, thr)
    nan = torch.randn(100)
    nan[3] = float("nan")
    huge = torch.randn(100)
    huge[0] = 3e38
    for g, t in ((nan, nan.clone()), (torch.randn(100), nan), (huge, huge.clone()), (torch.empty(0), torch.empty(0))):
        assert K.fused_pair_stats(g, t) is None  # the reference path takes these
        K.pair_stats(g, t)


def test_logits_metrics_in_one_pass_equal_the_per_position_functions(monkeypatch):
    torch.manual_seed(1)
    g = torch.randn(1, 150, 300)
    t = (g + 0.05 * torch.randn_like(g)).to(torch.bfloat16)
    monkeypatch.setattr(K, "LOGIT_BLOCK", 64 * 300)  # blocks of 64 positions: three, the last one short
    summary = K.logits_metrics(g, t)
    kl = K.kl_per_position(g, t)
    diff = K.logprob_diff_per_position(g, t, K.top1_per_position(t))
    assert summary["kl"] == pytest.approx(float(kl.mean()), rel=1e-12)
    assert summary["kl_max"] == pytest.approx(float(kl.max()), rel=1e-12)
    assert summary["logprob_diff_max"] == pytest.approx(float(diff.max()), rel=1e-12)
    assert summary["logprob_diff_mean"] == pytest.approx(float(diff.mean()), rel=1e-12)
    agree = (K.top1_per_position(g) == K.top1_per_position(t)).double().mean()
    assert summary["top1_agree"] == pytest.approx(float(agree))
    assert summary["golden_margin"] == pytest.approx(float(K.top1_margin_per_position(g)[-1]))
