"""Argument checks of every public function (DESIGN §1): each violation raises ValueError or
TypeError before any kernel runs, with a message naming the function and the offending shape;
non-contiguous inputs are accepted and give the contiguous result."""

import pytest
import torch

import fastbind as fb

B, D = 6, 5


def _mods(n, b=B, d=D, **kw):
    return [torch.randn(b, d, **kw) for _ in range(n)]


# name -> (call(tensors, **kw), number of [B, D] tensor arguments, all rows must match)
MULTI = {
    "gram_volume": (lambda ts, **kw: fb.gram_volume(*ts, **kw), 3),
    "gram_volume_paired": (lambda ts, **kw: fb.gram_volume_paired(*ts, **kw), 3),
    "gram_loss": (lambda ts, **kw: fb.gram_loss(*ts, **kw), 3),
    "infonce": (lambda ts, **kw: fb.infonce(*ts, **kw), 2),
    "anchor_loss": (lambda ts, **kw: fb.anchor_loss(*ts, **kw), 3),
    "centroid_loss": (lambda ts, **kw: fb.centroid_loss(*ts, **kw), 3),
    "centroid_similarity": (lambda ts, **kw: fb.centroid_similarity(*ts, **kw), 3),
}


@pytest.mark.parametrize("name", MULTI)
def test_wrong_rank(name):
    call, n = MULTI[name]
    ts = _mods(n)
    ts[1] = ts[1][0]  # [D]
    with pytest.raises(ValueError, match=rf"{name}: .*\[{D}\]"):
        call(ts)


@pytest.mark.parametrize("name", MULTI)
def test_mismatched_feature_dim_names_both_shapes(name):
    call, n = MULTI[name]
    ts = _mods(n)
    ts[-1] = torch.randn(B, D + 2)
    with pytest.raises(ValueError, match=rf"{name}: .*\[{B}, {D + 2}\].*{D}"):
        call(ts)


@pytest.mark.parametrize("name", [n for n in MULTI if n != "gram_volume"])
def test_mismatched_batch(name):
    call, n = MULTI[name]
    ts = _mods(n)
    ts[-1] = torch.randn(B + 1, D)
    with pytest.raises(ValueError, match=rf"{name}: .*\[{B + 1}, {D}\].*{B}"):
        call(ts)


def test_gram_volume_rows_of_data_modalities_must_match():
    a = torch.randn(4, D)
    with pytest.raises(ValueError, match=r"gram_volume: .*\[8, 5\]"):
        fb.gram_volume(a, torch.randn(7, D), torch.randn(8, D))
    assert fb.gram_volume(a, torch.randn(7, D), torch.randn(7, D)).shape == (4, 7)  # B1 != B2 is fine


@pytest.mark.parametrize("name", ["gram_volume", "gram_volume_paired", "gram_loss"])
@pytest.mark.parametrize("k", [1, 9])
def test_gram_k_out_of_range(name, k):
    call, _ = MULTI[name]
    with pytest.raises(ValueError, match=rf"{name}: .*k = {k}"):
        call(_mods(k, d=12))


@pytest.mark.parametrize("name", MULTI)
def test_integer_dtype(name):
    call, n = MULTI[name]
    ts = _mods(n)
    ts[0] = torch.randint(0, 3, (B, D))
    with pytest.raises(TypeError, match=rf"{name}: .*torch.int64"):
        call(ts)


@pytest.mark.parametrize("name", MULTI)
def test_mixed_devices(name):
    call, n = MULTI[name]
    ts = _mods(n)
    ts[1] = ts[1].to("meta")
    with pytest.raises(ValueError, match=rf"{name}: .*meta"):
        call(ts)


@pytest.mark.parametrize("name", MULTI)
def test_empty_batch(name):
    call, n = MULTI[name]
    with pytest.raises(ValueError, match=rf"{name}: .*empty"):
        call(_mods(n, b=0))


@pytest.mark.parametrize("name", MULTI)
@pytest.mark.parametrize("backend", ["torch", *[b for b in ("cpu",) if b in fb.backends()]])
def test_non_contiguous_accepted(name, backend):
    call, n = MULTI[name]
    wide = [torch.randn(B, 2 * D) for _ in range(n)]
    strided = [w[:, ::2] for w in wide]
    assert not strided[0].is_contiguous()
    dense = [s.contiguous() for s in strided]
    torch.testing.assert_close(call(strided, backend=backend), call(dense, backend=backend))


@pytest.mark.parametrize("name", ["gram_loss", "infonce", "anchor_loss", "centroid_loss"])
def test_bad_temperature_and_smoothing(name):
    call, n = MULTI[name]
    ts = _mods(n)
    with pytest.raises(ValueError, match="temperature"):
        call(ts, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        call(ts, temperature=torch.ones(2))
    with pytest.raises(ValueError, match="label_smoothing"):
        call(ts, label_smoothing=1.5)


@pytest.mark.parametrize("name", ["gram_loss", "infonce"])
def test_bad_direction_and_reduction(name):
    call, n = MULTI[name]
    ts = _mods(n)
    with pytest.raises(ValueError, match="direction"):
        call(ts, direction="sideways")
    with pytest.raises(ValueError, match="reduction"):
        call(ts, reduction="max")


def test_codebook_checks():
    x, e = torch.randn(7, D), torch.randn(11, D)
    with pytest.raises(ValueError, match=r"codebook_lookup: .*\[11, 6\]"):
        fb.codebook_lookup(x, torch.randn(11, 6))
    with pytest.raises(ValueError, match=r"codebook_lookup: .*codebook.*\[11\]"):
        fb.codebook_lookup(x, e[:, 0])
    with pytest.raises(TypeError, match=r"codebook_lookup: .*torch.int64"):
        fb.codebook_lookup(x.long(), e)
    with pytest.raises(ValueError, match=r"codebook_lookup: .*k"):
        fb.codebook_lookup(x, e, k=12)
    with pytest.raises(ValueError, match=r"codebook_lookup: .*k"):
        fb.codebook_lookup(x, e, k=0)
    with pytest.raises(ValueError, match=r"codebook_lookup: .*metric"):
        fb.codebook_lookup(x, e, metric="hamming")
    with pytest.raises(ValueError, match=r"codebook_lookup: .*weight"):
        fb.codebook_lookup(x, e, weight=torch.ones(D + 1))
    with pytest.raises(ValueError, match=r"codebook_lookup: .*weight"):
        fb.codebook_lookup(x, e, weight=-torch.ones(D))
    with pytest.raises(ValueError, match=r"codebook_lookup: .*empty"):
        fb.codebook_lookup(x[:0], e)
    with pytest.raises(ValueError, match=r"codebook_lookup: .*meta"):
        fb.codebook_lookup(x, e.to("meta"))
    with pytest.raises(ValueError, match=r"toc_select: .*keep"):
        fb.toc_select(e, keep=D + 1)
    strided = torch.randn(7, 2 * D)[:, ::2]
    for backend in ["torch", *[b for b in ("cpu",) if b in fb.backends()]]:
        d1, i1 = fb.codebook_lookup(strided, e, k=2, backend=backend)
        d2, i2 = fb.codebook_lookup(strided.contiguous(), e, k=2, backend=backend)
        torch.testing.assert_close(d1, d2)
        assert torch.equal(i1, i2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "name", ["gram_volume", "gram_volume_paired", "gram_loss", "infonce", "anchor_loss", "centroid_loss"]
)
def test_reference_takes_16bit_inputs_with_float32_accumulation(name, dtype):
    """The torch backend accepts 16-bit inputs like the fused ones: float32 maths on the rounded
    inputs (losses come back in float32, volumes in the input dtype)."""
    call, n = MULTI[name]
    ts = [t.to(dtype) for t in _mods(n)]
    out = call(ts, backend="torch")
    expected = call([t.float() for t in ts], backend="torch")
    assert out.dtype == (dtype if name.startswith("gram_volume") else torch.float32)
    if name != "centroid_loss":  # (the centroid itself is rounded to the operand dtype, by design)
        torch.testing.assert_close(out.float(), expected.to(out.dtype).float())
    if "cpu" in fb.backends():
        torch.testing.assert_close(call(ts, backend="cpu").float(), out.float(), atol=2e-2, rtol=2e-2)
