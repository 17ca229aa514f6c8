"""VectorQuantizer on bad input (issue 12, points 3, 7 and 10): non-finite tokens never reach the
codebook, every module dtype trains, and bad constructor / method arguments raise clear errors."""

import copy
import math
import warnings

import pytest
import torch

from fastbind.nn import VectorQuantizer
from fastbind.nn.vq import code_matching_loss


def _step(vq, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return vq(x)


# ------------------------------------------------------------------ non-finite tokens (point 3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_token_is_kept_out_of_the_ema(bad):
    torch.manual_seed(0)
    e0 = torch.randn(6, 4)
    batches = [torch.randn(20, 4) for _ in range(3)]
    dirty = [b.clone() for b in batches]
    dirty[0][3, 1] = bad  # one bad token in the first and in the last batch
    dirty[2][7] = bad
    clean = [batches[0][[i for i in range(20) if i != 3]], batches[1], batches[2][[i for i in range(20) if i != 7]]]

    vq_dirty = VectorQuantizer(6, 4, init="none", dead_code_steps=0)
    vq_clean = VectorQuantizer(6, 4, init="none", dead_code_steps=0)
    vq_dirty.initialize(e0)
    vq_clean.initialize(e0)
    for x_dirty, x_clean in zip(dirty, clean):
        with pytest.warns(RuntimeWarning, match="non-finite") if not torch.isfinite(x_dirty).all() else _nothing():
            q, _, loss = vq_dirty(x_dirty)
        vq_clean(x_clean)
        rows = ~torch.isfinite(x_dirty).all(-1)
        assert not torch.isfinite(q[rows]).all(-1).any()  # every bad token's output is non-finite
        assert torch.isfinite(q[~rows]).all()
        if rows.any():
            assert not math.isfinite(float(loss))  # the loss shows the bad token (a NaN check fires)
    assert torch.isfinite(vq_dirty.codebook).all()
    assert torch.isfinite(vq_dirty.ema_sum).all() and torch.isfinite(vq_dirty.ema_count).all()
    # the codebook is exactly the one trained without the bad tokens
    torch.testing.assert_close(vq_dirty.codebook, vq_clean.codebook, rtol=0, atol=0)
    torch.testing.assert_close(vq_dirty.ema_count, vq_clean.ema_count, rtol=0, atol=0)
    assert vq_dirty.statistics()["nonfinite_tokens"] == 2
    # the layer keeps choosing every code it chose before (the old bug: code 0 NaN, never chosen again)
    _, idx, loss = vq_dirty(batches[1])
    assert math.isfinite(float(loss))


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_nonfinite_position_is_dropped_from_every_modality():
    """Paired tokens: a NaN in modality 1 at position t keeps position t of *both* modalities out
    (modality 0's token is scattered by modality 1's index in the cross term)."""
    torch.manual_seed(1)
    e0 = torch.randn(5, 3)
    za, zv = torch.randn(4, 6, 3), torch.randn(4, 6, 3)
    zv_bad = zv.clone()
    zv_bad[2, 4, 0] = float("nan")
    keep = torch.ones(4, 6, dtype=torch.bool)
    keep[2, 4] = False
    vq_dirty = VectorQuantizer(5, 3, modalities=2, init="none", dead_code_steps=0)
    vq_clean = VectorQuantizer(5, 3, modalities=2, init="none", dead_code_steps=0)
    vq_dirty.initialize(e0)
    vq_clean.initialize(e0)
    with pytest.warns(RuntimeWarning, match="1 of 24 token positions"):
        (qa, qv), _, _ = vq_dirty([za, zv_bad])
    vq_clean([za[keep], zv[keep]])
    torch.testing.assert_close(vq_dirty.codebook, vq_clean.codebook, rtol=0, atol=0)
    assert torch.isfinite(qa).all()  # modality 0's own output is unaffected
    assert torch.isnan(qv[2, 4, 0])  # NaN in, NaN out (the straight-through value x + (q − x))


def test_nonfinite_tokens_are_kept_out_of_kmeanspp_init():
    data = torch.randn(64, 4)
    dirty = data.clone()
    dirty[::5, 2] = float("nan")
    torch.manual_seed(3)
    vq_dirty = VectorQuantizer(8, 4, dead_code_steps=0)
    torch.manual_seed(3)
    vq_clean = VectorQuantizer(8, 4, dead_code_steps=0)
    _step(vq_dirty, dirty)
    vq_clean(data[torch.isfinite(dirty).all(-1)])
    assert torch.isfinite(vq_dirty.codebook).all()
    torch.testing.assert_close(vq_dirty.codebook, vq_clean.codebook, rtol=0, atol=0)


def test_all_nonfinite_first_batch_leaves_the_codebook_uninitialised():
    torch.manual_seed(4)
    vq = VectorQuantizer(4, 3, dead_code_steps=0)
    _step(vq, torch.full((10, 3), float("nan")))
    assert not vq.initialized and vq.step == 1
    vq(torch.randn(10, 3))  # the first finite batch initialises
    assert vq.initialized and torch.isfinite(vq.codebook).all()
    assert vq.statistics()["nonfinite_tokens"] == 10


def test_nonfinite_tokens_in_eval_are_counted_and_do_not_touch_the_codebook():
    vq = VectorQuantizer(4, 3, init="none").eval()
    before = vq.codebook.clone()
    x = torch.randn(5, 3)
    x[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        q, _, _ = vq(x)
    assert torch.isnan(q[0, 0]) and torch.equal(vq.codebook, before)
    assert vq.statistics()["perplexity"][0] > 0


# ------------------------------------------------------------------ module dtypes (point 7)


CASTS = {
    "half()": (lambda m: m.half(), torch.float16),
    "bfloat16()": (lambda m: m.bfloat16(), torch.bfloat16),
    "double()": (lambda m: m.double(), torch.float64),
    "to(float16)": (lambda m: m.to(torch.float16), torch.float16),
    "to(float64)": (lambda m: m.to(dtype=torch.float64), torch.float64),
    "float()": (lambda m: m.float(), torch.float32),
}


@pytest.mark.parametrize("modalities", [1, 2])
@pytest.mark.parametrize("cast", list(CASTS))
def test_every_module_dtype_trains(cast, modalities):
    fn, dtype = CASTS[cast]
    torch.manual_seed(5)
    e0 = torch.randn(6, 4)
    xs = [[torch.randn(3, 5, 4) for _ in range(modalities)] for _ in range(3)]
    ref = VectorQuantizer(6, 4, modalities=modalities, init="none", dead_code_steps=0).double()
    ref.initialize(e0.double())
    vq = fn(VectorQuantizer(6, 4, modalities=modalities, init="none", dead_code_steps=0))
    vq.initialize(e0)
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    assert vq.codebook.dtype == dtype
    assert vq.ema_sum.dtype == stat and vq.ema_count.dtype == stat
    for batch in xs:
        # inputs in the module's dtype, as a model cast with .half()/.double() produces them
        ins = [x.to(dtype).requires_grad_() for x in batch]
        q, idx, loss = vq(ins if modalities > 1 else ins[0])
        ref([x.double() for x in batch] if modalities > 1 else batch[0].double())
        loss.backward()
        assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in ins)
        assert (q[0] if modalities > 1 else q).dtype == dtype
    assert vq.ema_sum.dtype == stat and torch.isfinite(vq.codebook).all()
    # the statistics follow the float64 run: exactly (float64), to float32 round-off, or to the
    # rounding of the low-precision tokens (the assignments may differ there: compare loosely)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 5e-2)
    torch.testing.assert_close(vq.ema_count.double(), ref.ema_count, rtol=tol, atol=tol)
    torch.testing.assert_close(vq.codebook.double(), ref.codebook, rtol=tol, atol=tol)


def test_dtype_cast_after_training_keeps_the_statistics_exact():
    vq = VectorQuantizer(6, 4, dead_code_steps=0)
    vq(torch.randn(32, 4))
    ema_sum, ema_count = vq.ema_sum.clone(), vq.ema_count.clone()
    vq.half()
    assert torch.equal(vq.ema_sum, ema_sum) and torch.equal(vq.ema_count, ema_count)  # no float16 round trip
    vq.float()
    assert vq.codebook.dtype == torch.float32 and torch.equal(vq.ema_sum, ema_sum)
    vq.double()
    assert vq.ema_sum.dtype == torch.float64 and torch.equal(vq.ema_sum, ema_sum.double())


def test_float32_module_takes_low_precision_tokens():
    vq = VectorQuantizer(6, 4, dead_code_steps=0)
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        q, _, loss = vq(torch.randn(16, 4, dtype=dtype))
        assert q.dtype == dtype and math.isfinite(float(loss))
    assert vq.ema_sum.dtype == torch.float32


# ------------------------------------------------------------------ clear errors (point 10)


@pytest.mark.parametrize(
    "args,kwargs,exc,message",
    [
        ((8, 4), {"eps": -1.0}, ValueError, "eps must be > 0"),
        ((8, 4), {"eps": 0.0}, ValueError, "eps must be > 0"),
        ((8, 4), {"eps": float("nan")}, ValueError, "eps must be > 0"),
        ((2.5, 8), {}, TypeError, "num_codes must be an int"),
        ((8, 4.0), {}, TypeError, "dim must be an int"),
        ((True, 4), {}, TypeError, "num_codes must be an int"),
        ((1, 4), {}, ValueError, "num_codes must be >= 2"),
        ((8, 4), {"decay": float("nan")}, ValueError, "decay must be in"),
        ((8, 4), {"decay": 1.0}, ValueError, "decay must be in"),
        ((8, 4), {"commitment": float("inf")}, ValueError, "commitment must be >= 0"),
        ((8, 4), {"commitment": "0.25"}, TypeError, "commitment must be a float"),
        ((8, 4), {"dead_code_steps": -1}, ValueError, "dead_code_steps must be >= 0"),
        ((8, 4), {"dead_code_steps": 2.0}, TypeError, "dead_code_steps must be an int"),
        ((8, 4), {"modalities": 0}, ValueError, "modalities must be >= 1"),
        ((8, 4), {"w_cross": float("nan")}, ValueError, "w_cross must be >= 0"),
        ((8, 4), {"matching_temperature": 0.0}, ValueError, "matching_temperature must be > 0"),
        ((8, 4), {"matching_weight": -1.0}, ValueError, "matching_weight must be >= 0"),
        ((8, 4), {"matching_form": "clip"}, ValueError, "matching_form must be one of"),
        ((8, 4), {"count_init": 0}, ValueError, "count_init must be one of"),
        ((8, 4), {"laplace": "smoothed"}, ValueError, "laplace must be one of"),
    ],
)
def test_constructor_errors(args, kwargs, exc, message):
    with pytest.raises(exc, match=message):
        VectorQuantizer(*args, **kwargs)


def test_apply_toc_keep_out_of_range():
    vq = VectorQuantizer(8, 4)
    for keep in (0, 5, -1):
        with pytest.raises(ValueError, match="keep = .* out of range"):
            vq.apply_toc(keep)
    with pytest.raises(TypeError, match="keep must be an int"):
        vq.apply_toc(2.0)
    assert not vq.weighted
    mask = vq.apply_toc(2)
    assert vq.weighted and mask.sum() == 2


def test_set_dim_weight_and_initialize_reject_bad_values():
    vq = VectorQuantizer(4, 3, init="none")
    before = vq.codebook.clone()
    for weight, message in [
        (torch.tensor([1.0, float("nan"), 1.0]), "non-finite"),
        (torch.tensor([1.0, float("inf"), 1.0]), "non-finite"),
        (torch.zeros(3), "at least one positive"),
        (torch.tensor([1.0, -1.0, 1.0]), "non-negative"),
        (torch.ones(4), r"shape \[4\], expected \[3\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            vq.set_dim_weight(weight)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        vq.set_dim_weight([1.0, 1.0, 1.0])
    assert not vq.weighted
    bad = torch.randn(4, 3)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        vq.initialize(bad)
    with pytest.raises(ValueError, match=r"expected \[4, 3\]"):
        vq.initialize(torch.randn(3, 3))
    with pytest.raises(TypeError, match="floating dtype"):
        vq.initialize(torch.ones(4, 3, dtype=torch.int64))
    assert torch.equal(vq.codebook, before)


def test_one_dimensional_tokens():
    """A single token [D]: quantised alone; with matching_weight (a contrastive loss over a batch)
    a clear error instead of a reshape failure."""
    vq = VectorQuantizer(4, 3, modalities=2, matching_weight=0.5)
    with pytest.raises(ValueError, match="need a batch dimension"):
        vq([torch.randn(3), torch.randn(3)])
    with pytest.raises(ValueError, match="need a batch dimension"):
        code_matching_loss([torch.randn(3), torch.randn(3)], torch.randn(4, 3))
    (qa, qv), (ia, iv), loss = VectorQuantizer(4, 3, modalities=2)([torch.randn(3), torch.randn(3)])
    assert qa.shape == (3,) and ia.shape == () and math.isfinite(float(loss))
    (qa, _), _, loss = vq([torch.randn(1, 3), torch.randn(1, 3)])  # B = 1: a batch of one sample
    assert qa.shape == (1, 3) and math.isfinite(float(loss))


def test_load_state_dict_with_assign_still_restores_the_state():
    """load_state_dict(assign=True) sets the codebook by attribute: the `vq.codebook = cb` hook must
    not reset the loaded EMA state (the later buffers and the extra state are loaded after it)."""
    src = VectorQuantizer(6, 3, dead_code_steps=0)
    src(torch.randn(40, 3))
    dst = VectorQuantizer(6, 3, dead_code_steps=0)
    dst.load_state_dict(copy.deepcopy(src.state_dict()), assign=True)
    assert dst.step == src.step and torch.equal(dst.ema_count, src.ema_count)
    x = torch.randn(30, 3)
    assert torch.equal(dst(x)[1], src(x)[1]) and torch.equal(dst.codebook, src.codebook)
