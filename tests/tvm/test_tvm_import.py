"""The TVM importer's legalisation layer: assertion stripping and each custom converter alone.

Every converter is compared against PyTorch on a tiny program that uses it (built for x86 and
run through the artifact runtime). Tolerance: these ops only move or select values (masked
scatter, unfold, boolean reductions), so results must be exact (atol 0).
"""

from __future__ import annotations

import operator

import pytest
import torch

pytest.importorskip("tvm")

from loopify.backends.tvm import compile_program  # noqa: E402
from loopify.backends.tvm.importer import (  # noqa: E402
    ASSERTION_TARGETS, _logical, _sym_ite, custom_convert_map, import_program, strip_assertions)


def _export(module, *args):
    with torch.no_grad():
        return torch.export.export(module, args, strict=False)


def _run_compiled(ep, args, tmp_path):
    import loopify.runtime as rt

    res = compile_program(ep, "x86", tmp_path / "art")
    return rt.load(res.path)(*args)


class MaskedScatter(torch.nn.Module):
    def forward(self, x, mask, src):
        return (x.masked_scatter(mask, src),)


class Unfold(torch.nn.Module):
    def forward(self, x):
        return (x.unfold(1, 3, 2) * 1.0,)


class AllTrue(torch.nn.Module):
    def forward(self, x):
        return (torch.ops.aten._is_all_true(x > 0).to(torch.int64),)


def test_masked_scatter_matches_torch(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 1, 0, 1]], dtype=torch.bool)[..., None]  # broadcast
    src = torch.randn(6, 3) * 10
    ep = _export(MaskedScatter(), x, mask, src)
    got = _run_compiled(ep, (x, mask, src), tmp_path)[0]
    torch.testing.assert_close(got, MaskedScatter()(x, mask, src)[0], rtol=0, atol=0)


def test_unfold_matches_torch(tmp_path):
    x = torch.arange(2 * 9 * 4, dtype=torch.float32).reshape(2, 9, 4)
    got = _run_compiled(_export(Unfold(), x), (x,), tmp_path)[0]
    torch.testing.assert_close(got, Unfold()(x)[0], rtol=0, atol=0)


class SliceIndex(torch.nn.Module):
    """Several index tensors beside full slices: ``F.unfold``'s im2col gather (Mistral3's patch
    merger), the adjacent case where PyTorch keeps the broadcast axes in place, and the apart one
    where they come first."""

    def __init__(self, kind: int):
        super().__init__()
        self.kind = kind

    def forward(self, x):
        a = torch.tensor([[0, 1], [2, 3]]).reshape(2, 2, 1, 1)
        b = torch.tensor([[0, 1], [1, 2]])
        if self.kind == 0:
            return (x[:, :, a, b],)
        if self.kind == 1:
            return (x[:, a[:, :, 0, 0], :, b],)
        return (torch.nn.functional.unfold(x, kernel_size=2, stride=2),)


@pytest.mark.parametrize("kind", [0, 1, 2])
def test_index_with_slices_matches_torch(tmp_path, kind):
    x = torch.arange(1 * 5 * 4 * 4, dtype=torch.float32).reshape(1, 5, 4, 4)
    got = _run_compiled(_export(SliceIndex(kind), x), (x,), tmp_path)[0]
    torch.testing.assert_close(got, SliceIndex(kind)(x)[0], rtol=0, atol=0)


class GridSample(torch.nn.Module):
    def __init__(self, mode: str, padding: str, align: bool):
        super().__init__()
        self.opts = dict(mode=mode, padding_mode=padding, align_corners=align)

    def forward(self, x, grid):
        return (torch.nn.functional.grid_sample(x, grid, **self.opts),)


@pytest.mark.parametrize("opts", [("bicubic", "border", False), ("bilinear", "zeros", False),
                                  ("nearest", "zeros", True)])
def test_grid_sample_takes_torchs_grid_layout(tmp_path, opts):
    """torch's grid is (N, H, W, 2), TVM's (N, 2, H, W). Interpolation weights reorder float32
    sums: 1e-5 absolute on values ~1 (measured up to 9.5e-7), points outside [-1, 1] included."""
    torch.manual_seed(0)
    x, grid = torch.randn(1, 3, 5, 4), torch.rand(1, 6, 2, 2) * 2.4 - 1.2
    got = _run_compiled(_export(GridSample(*opts), x, grid), (x, grid), tmp_path)[0]
    torch.testing.assert_close(got, GridSample(*opts)(x, grid)[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("values", [[1.0, 2.0, 3.0], [1.0, -2.0, 3.0]])
def test_is_all_true_matches_torch(tmp_path, values):
    x = torch.tensor(values)
    got = _run_compiled(_export(AllTrue(), x), (x,), tmp_path)[0]
    assert int(got) == int(AllTrue()(x)[0])


class _StaticImporter:
    """What the symbolic-scalar converters need of the importer when every input is static."""

    block_builder = None

    def _retrieve_args(self, args):
        return args


class _Node:
    def __init__(self, *args):
        self.args = args


@pytest.mark.parametrize("cond,expected", [(True, 7), (False, 9)])
def test_sym_ite_static(cond, expected):
    # Shape facts export proved are plain Python values at import time: pick the branch.
    assert _sym_ite(_Node(cond, 7, 9), _StaticImporter()) == expected


@pytest.mark.parametrize("op,args,expected", [
    (operator.or_, (False, True), True), (operator.and_, (True, False), False),
    (operator.not_, (False,), True)])
def test_logical_static(op, args, expected):
    assert _logical(op, "unused")(_Node(*args), _StaticImporter()) is expected


def test_logical_on_tensors_builds_relax_ops():
    from tvm import relax

    bb = relax.BlockBuilder()
    a = relax.Var("a", relax.TensorType([], "bool"))
    b = relax.Var("b", relax.TensorType([], "bool"))

    class Imp:
        block_builder = bb

        def _retrieve_args(self, args):
            return args

    with bb.function("f", [a, b]):
        out = _logical(operator.or_, "logical_or")(_Node(a, b), Imp())
        out2 = _logical(operator.not_, "logical_not")(_Node(out), Imp())
        bb.emit_func_output(out2)
    text = bb.get().script()
    assert "logical_or" in text and "logical_not" in text


class WithAssert(torch.nn.Module):
    def forward(self, x, n):
        k = n.item()
        torch._check(k >= 1)
        torch._check(k <= 4)
        return (x * 2,)


def test_strip_assertions_removes_checks_and_keeps_program():
    ep = _export(WithAssert(), torch.randn(3), torch.tensor(2))
    before = [n for n in ep.graph.nodes if n.op == "call_function"
              and str(n.target).split(".")[-2 if "." in str(n.target) else -1] in ASSERTION_TARGETS]
    stripped, removed = strip_assertions(ep)
    names = [str(n.target) for n in stripped.graph.nodes]
    assert not any("_assert" in s or "sym_constrain" in s for s in names)
    assert removed >= len(before)
    # the caller's program is untouched
    assert len(list(ep.graph.nodes)) == len(list(stripped.graph.nodes)) + removed
    mod = import_program(ep)
    assert "main" in [gv.name_hint for gv in mod.get_global_vars()]


def test_converters_cover_zoo_ops():
    # The ops the zoo's VLMs need beyond TVM's own importer (DESIGN.md).
    assert {"masked_scatter.default", "unfold.default", "_is_all_true.default", "sym_ite", "or_",
            "sym_not"} <= set(custom_convert_map())


class MaskIndex(torch.nn.Module):
    """Boolean-mask selections as Idefics3 drops padding images: data-dependent sizes."""

    def forward(self, x, keep, cols):
        rows = x[keep]                      # mask over dim 0
        picked = x[:, cols]                 # mask over dim 1 (index list [None, mask])
        return (rows * 2, picked + 1, x[x.sum(-1) > 0].sum(0, keepdim=True))


def _mask_inputs():
    torch.manual_seed(0)
    x = torch.randn(4, 5).abs()
    x[2] = -x[2]  # row 2 sums < 0: three rows kept
    keep = torch.tensor([True, False, True, True])
    cols = torch.tensor([False, True, True, False, True])
    return x, keep, cols


def test_bool_mask_index_without_example_is_refused_with_reason():
    from loopify.backends.tvm.errors import CompileError

    x, keep, cols = _mask_inputs()
    ep = _export(MaskIndex(), x, keep, cols)
    with pytest.raises(CompileError, match="boolean-mask indexing") as err:
        import_program(ep)
    assert "\n" not in str(err.value)


def test_bool_mask_index_is_specialised_to_the_example_count(tmp_path):
    # The selections become static gathers of the example's true positions: exact (atol 0);
    # the counts are recorded as assumptions in the manifest.
    import loopify.runtime as rt

    x, keep, cols = _mask_inputs()
    ep = _export(MaskIndex(), x, keep, cols)
    res = compile_program(ep, "x86", tmp_path / "art", example=(x, keep, cols))
    art = rt.load(res.path)
    for got, want in zip(art(x, keep, cols), MaskIndex()(x, keep, cols)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    counts = sorted(a["count"] for a in art.manifest["assumptions"])
    assert counts == [3, 3, 3]
    # other values with the same counts: still exact
    x2 = torch.randn(4, 5)
    x2[0] = -x2[0].abs()
    x2[1:] = x2[1:].abs()
    keep2 = torch.tensor([False, True, True, True])
    cols2 = torch.tensor([True, True, False, False, True])
    for got, want in zip(art(x2, keep2, cols2), MaskIndex()(x2, keep2, cols2)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # another count breaks the assumption: one clear error, not silently wrong numbers
    from loopify.errors import LoopifyError

    with pytest.raises(LoopifyError, match="break what the artifact was compiled for") as err:
        art(x, torch.tensor([True, True, True, True]), cols)
    assert "\n" not in str(err.value)


class IntReciprocal(torch.nn.Module):
    def forward(self, m):
        n = (m > 0).sum(-1)             # int64 count
        return (torch.arange(4.0) * n.reciprocal()[:, None], torch.exp(n)[:, None] * 1.0)


def test_float_ops_on_integers_promote_as_torch_does(tmp_path):
    # TVM's converters keep the input dtype: 1/int64 was integer division (0), which broke
    # Idefics3's patch positions. loopify casts to the float result dtype first.
    m = torch.tensor([[1.0, 2.0, -1.0, 3.0], [1.0, -1.0, -1.0, -1.0]])
    ep = _export(IntReciprocal(), m)
    got = _run_compiled(ep, (m,), tmp_path)
    for g, w in zip(got, IntReciprocal()(m)):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=0)


class IntFloatArith(torch.nn.Module):
    def forward(self, i, f):  # int64 coordinates with Python floats and float tensors: float in torch
        return ((i + 0.5) / f * 2 - 1, i * 0.25 - 0.5, i / (i + 1))


def test_integer_tensor_with_floats_promotes_as_torch_does(tmp_path):
    # TVM's binary converters made 0.5 an int64 constant (0): GLM-4V's position grid moved by
    # half a patch. Values are exact binary fractions here except the divisions: 1e-6 relative.
    i, f = torch.arange(6).reshape(2, 3), torch.full((2, 3), 4.0)
    got = _run_compiled(_export(IntFloatArith(), i, f), (i, f), tmp_path)
    for g, w in zip(got, IntFloatArith()(i, f)):
        assert g.dtype == w.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=1e-6, atol=0)


class WhereMixed(torch.nn.Module):
    def forward(self, cond, x):  # x int32, the other branch a 0-d int64: torch's result is int32
        return (torch.where(cond, x, torch.tensor(7, dtype=torch.int64)) * 3,)


def test_where_promotes_its_branches_as_torch_does(tmp_path):
    """Gemma3's token-type positions: ``where(cond, int32 [1, T], int64 0-d)`` has torch's
    promoted dtype (int32: a 0-d tensor does not widen); TVM's converter refused the mixed
    branches. Exact (integers)."""
    cond = torch.tensor([[True, False, True, False]])
    x = torch.tensor([[1, 2, 3, 4]], dtype=torch.int32)
    ep = _export(WhereMixed(), cond, x)
    got = _run_compiled(ep, (cond, x), tmp_path)[0]
    want = WhereMixed()(cond, x)[0]
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)


class IntegerIndexing(torch.nn.Module):
    """What the multi-resolution pooling computes on int64 positions: ``//`` and ``%`` by a
    Python int, a one-sided ``clamp`` and ``amin`` / ``amax`` (TVM's own converters made the
    constant int32, put +-inf for the missing bound, and had no amin / amax)."""

    def forward(self, x):
        pos = torch.arange(x.shape[1]).expand(x.shape[0], -1)
        g = pos // 3
        r = (pos + 1) % 4
        first = torch.where(g.unsqueeze(1) == torch.arange(3).view(1, -1, 1), pos.unsqueeze(1), 99).amin(-1)
        last = torch.where(g.unsqueeze(1) == torch.arange(3).view(1, -1, 1), pos.unsqueeze(1), -1).amax(-1, keepdim=True)
        return g + r, first.clamp(max=5), last.clamp(min=4), x.amax(1)


def test_integer_floor_div_mod_clamp_and_amin_amax_match_torch(tmp_path):
    x = torch.randn(2, 8)
    ep = _export(IntegerIndexing(), x)
    got = _run_compiled(ep, (x,), tmp_path)
    for g, w in zip(got, IntegerIndexing()(x)):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


class LastOfSymbolic(torch.nn.Module):
    def forward(self, x):
        return x[:, -1] * 1.0, x.select(1, -1) + 0, torch.arange(x.shape[1])[-1] + 0


def test_negative_index_on_a_symbolic_axis_counts_from_the_end():
    """``x[:, -1]`` over a symbolic token count: TVM's ``take`` clipped -1 to 0 (the first
    token) when the axis had no static size; loopify's importer adds the run-time size."""
    import numpy as np
    import tvm
    from torch.export import Dim
    from tvm import relax

    ep = torch.export.export(LastOfSymbolic(), (torch.randn(2, 5, 3),), dynamic_shapes=({1: Dim("T", min=3, max=64)},),
                             strict=False)
    vm = relax.VirtualMachine(tvm.compile(import_program(ep), target="llvm"), tvm.cpu())
    for t in (3, 7):
        x = torch.randn(2, t, 3)
        for got, want in zip(vm["main"](tvm.runtime.tensor(x.numpy())), LastOfSymbolic()(x)):
            np.testing.assert_array_equal(got.numpy(), want.numpy())
