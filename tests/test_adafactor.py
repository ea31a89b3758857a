"""train/adafactor.py against its oracle, torch.optim.Adafactor (the same update, to float rounding),
and the skip flag it takes (found_inf: a flagged step changes nothing, an unflagged one is the plain step).
FSDP2 (sharded parameters, where torch's optimizer fails) is tested through the trainer in
tests/test_train_distributed.py."""
from __future__ import annotations

import copy

import pytest
import torch

from videoprism.train import adafactor
from videoprism.train.adafactor import Adafactor

# Matrices, a 3-D tensor (factored over its last two dims), vectors, and single-row / single-column
# matrices (one factor is a scalar per slice); shapes repeated within a parameter group (updated as one
# stacked tensor) and across the two groups (kept apart: their hyper-parameters differ).
SHAPES = [(7, 5), (3, 4, 6), (9,), (7, 5), (9,), (3, 4, 6), (1, 8), (8, 1), (16,), (1, 8), (16,), (7, 5), (16,)]


@pytest.fixture(params=[False, True], ids=["per-parameter", "stacked"])
def stacking(request, monkeypatch):
    """Both ways of updating: one parameter at a time (the CPU's default) and same-shape parameters as one
    stacked tensor (the GPU's), here on the CPU."""
    monkeypatch.setattr(adafactor, "STACK_DEVICES", ("cpu", "cuda") if request.param else ("cuda",))
    return request.param


def params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).requires_grad_() for s in SHAPES]


def groups(ps):
    return [{"params": ps[:6], "weight_decay": 0.1}, {"params": ps[6:]}]


def set_grads(ps, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g) * (10.0 if step % 2 else 0.1)  # relative step clipping on, off


def steps_agree(opt, ours, ref, theirs, steps):
    """Both optimizers step on the same gradients; the parameters agree after each step."""
    for step in steps:
        set_grads(ours, step)
        set_grads(theirs, step)
        opt.step()
        ref.step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("chunk", [None, 40])  # the default (one chunk here), and chunks of a few parameters
@pytest.mark.parametrize("lr, eps", [(0.05, (None, 1e-3)), (1e-3, (1e-20, 1e-2))])
def test_adafactor_matches_torch_adafactor(lr, eps, chunk, monkeypatch, stacking):
    if chunk:
        monkeypatch.setattr(adafactor, "_CHUNK", chunk)
    ours, theirs = params(), params()
    opt = Adafactor(groups(ours), lr=lr, eps=eps)
    ref = torch.optim.Adafactor(groups(theirs), lr=lr, eps=eps, foreach=False)
    steps_agree(opt, ours, ref, theirs, range(8))
    got, want = opt.state_dict()["state"], ref.state_dict()["state"]
    for i in want:
        assert got[i].keys() == want[i].keys()
        for k in want[i]:
            torch.testing.assert_close(got[i][k].float(), want[i][k].float(), rtol=1e-6, atol=0)


# A step size far above any parameter's RMS here: torch's alpha = max(eps2, RMS(p)) * lr / BIG is then lr itself.
BIG = 1e4


@pytest.mark.parametrize("momentum, relative", [(0.9, True), (0.0, False), (0.9, False)])
def test_the_switches_match_torch_adafactor_steps_averaged(momentum, relative, stacking):
    """momentum and relative_step=False against an oracle built on torch.optim.Adafactor: at each step torch's
    optimizer, without weight decay, steps a copy of our current parameters (its statistics do not depend on
    them) and gives the step s; the oracle decays the parameters, averages s into M and adds M. Without the
    relative step torch's runs with eps2 = BIG and lr / BIG, so that its alpha is lr."""
    lr = 0.05
    ours, want = params(), params()
    shadows = [p.detach().clone().requires_grad_() for p in want]
    opt = Adafactor(groups(ours), lr=lr, momentum=momentum, relative_step=relative)
    ref = torch.optim.Adafactor(shadows, lr=lr if relative else lr / BIG, eps=(None, 1e-3 if relative else BIG),
                                foreach=False)
    decay = [0.1] * 6 + [0.0] * (len(SHAPES) - 6)  # groups()'s weight decay
    moms = [torch.zeros_like(p) for p in want]
    for step in range(8):
        set_grads(ours, step)
        set_grads(shadows, step)
        with torch.no_grad():
            for p, sh in zip(want, shadows):
                sh.copy_(p)
            ref.step()
            for p, sh, m, wd in zip(want, shadows, moms, decay):
                s = sh - p
                p.mul_(1 - lr * wd)
                m.lerp_(s, 1 - momentum)
                p.add_(m)
        opt.step()
        for a, b in zip(ours, want):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    got, theirs = opt.state_dict()["state"], ref.state_dict()["state"]
    for i in theirs:
        assert got[i].keys() - theirs[i].keys() == ({"momentum"} if momentum else set())
        for k in theirs[i]:
            torch.testing.assert_close(got[i][k].float(), theirs[i][k].float(), rtol=1e-6, atol=0)
        if momentum:
            torch.testing.assert_close(got[i]["momentum"], moms[i], rtol=1e-6, atol=1e-7)


def test_the_step_count_goes_on_past_2_to_the_24(stacking):
    """t counts past 2^24 = 16,777,216, also from a checkpoint holding the float32 count of before (which stopped
    there, and the relative step 1/sqrt(t) with it: at step 10^8 it was 2.4e-4, not 1e-4); the steps there are
    torch's Adafactor's with its step in float64 (a float32 one stops too)."""
    ours, theirs = params(), params()
    opt = Adafactor(groups(ours), lr=1.0)
    ref = torch.optim.Adafactor(groups(theirs), lr=1.0, foreach=False)
    steps_agree(opt, ours, ref, theirs, [0])
    for st in opt.state.values():
        st["step"] = torch.tensor(2.0**26)  # float32
    for st in ref.state.values():
        st["step"] = torch.tensor(2.0**26, dtype=torch.float64)
    steps_agree(opt, ours, ref, theirs, range(1, 4))
    assert {st["step"].item() for st in opt.state.values()} == {2**26 + 3}


def test_a_state_dict_without_the_switches_loads_as_torch_adafactor():
    """A checkpoint written before momentum and relative_step existed holds parameter groups without them:
    the step is then torch's."""
    ours, theirs = params(), params()
    opt = Adafactor(groups(ours), lr=0.05, momentum=0.9, relative_step=False)
    ref = torch.optim.Adafactor(groups(theirs), lr=0.05, foreach=False)
    set_grads(theirs, 0)
    ref.step()
    with torch.no_grad():
        for a, b in zip(ours, theirs):
            a.copy_(b)
    old = copy.deepcopy(Adafactor(groups(params()), lr=0.05).state_dict())
    old["state"] = copy.deepcopy(ref.state_dict()["state"])
    for group in old["param_groups"]:
        del group["momentum"], group["relative_step"]
    opt.load_state_dict(old)
    steps_agree(opt, ours, ref, theirs, (1, 2))


@pytest.mark.parametrize("switches", [{}, {"momentum": 0.9, "relative_step": False}], ids=["torch", "switches"])
def test_a_flagged_step_changes_nothing_and_an_unflagged_one_is_the_plain_step(stacking, switches):
    ps, plain = params(), params()
    opt, ref = Adafactor(groups(ps), lr=0.05, **switches), Adafactor(groups(plain), lr=0.05, **switches)
    for step in range(2):
        set_grads(ps, step)
        set_grads(plain, step)
        opt.found_inf = torch.zeros(())
        opt.step()
        ref.step()
    assert all(torch.equal(a, b) for a, b in zip(ps, plain))
    before, state = [p.detach().clone() for p in ps], copy.deepcopy(opt.state_dict())
    for p in ps:
        p.grad = torch.full_like(p, float("nan"))
    opt.found_inf = torch.ones(1)  # GradScaler's shape
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, ps))
    after = opt.state_dict()["state"]
    assert all(torch.equal(state["state"][i][k], after[i][k]) for i in after for k in after[i])


def test_a_flagged_first_step_leaves_a_fresh_state(stacking):
    ps = params()
    before = [p.detach().clone() for p in ps]
    opt = Adafactor(groups(ps), lr=0.05)
    set_grads(ps, 0)
    opt.found_inf = torch.ones(())
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, ps))
    for st in opt.state.values():
        assert st["step"].item() == 0 and all(torch.count_nonzero(v) == 0 for k, v in st.items() if k != "step")


def test_bad_hyper_parameters_are_refused_by_name():
    for kw, name in (({"lr": -1.0}, "lr"), ({"beta2_decay": 0.5}, "beta2_decay"), ({"d": 0.5}, "d"),
                     ({"eps": (None, -1.0)}, "eps"), ({"weight_decay": -1.0}, "weight_decay"),
                     ({"momentum": 1.0}, "momentum"), ({"momentum": -0.1}, "momentum")):
        with pytest.raises(ValueError, match=name):
            Adafactor(params(), **kw)


@pytest.mark.parametrize("switches", [{}, {"momentum": 0.9, "relative_step": False}], ids=["torch", "switches"])
def test_sharded_parameters_take_two_collectives_a_step_whatever_their_number(one_rank_group, monkeypatch,
                                                                                stacking, switches):
    """FSDP2 parameters (DTensors, here on a one-rank mesh): the sums that cross shards go out in one
    all-reduce before the update direction and one after, not a few per parameter; the update is the
    unsharded one and the state is stored as DTensors (what distributed checkpoints save and reshard)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.LayerNorm(6))
                                     for _ in range(5)])
    plain, sharded = model(), model()
    for block in sharded:
        fully_shard(block)
    fully_shard(sharded)
    # Two parameter groups, as the trainer makes them (weight decay on matrices only): one pair of
    # all-reduces for both.
    opts = [Adafactor([{"params": [p for p in m.parameters() if p.ndim > 1], "weight_decay": 0.1},
                       {"params": [p for p in m.parameters() if p.ndim == 1]}], lr=0.05, **switches)
            for m in (plain, sharded)]
    calls = []
    real = dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(3, 6)
    for step in range(3):
        for m, opt in zip((plain, sharded), opts):
            m(x * (step + 1)).square().sum().backward()
            opt.step()
            opt.zero_grad()
    assert len(calls) == 3 * 2, len(calls)  # 20 parameters
    for a, b in zip(plain.parameters(), sharded.parameters()):
        torch.testing.assert_close(a, b.full_tensor(), rtol=1e-6, atol=1e-7)
    assert all(isinstance(v, DTensor) for st in opts[1].state.values() for k, v in st.items() if k != "step")
    assert all(("momentum" in st) == bool(switches) for st in opts[1].state.values())


def test_chunks_hold_at_most_chunk_elements_unless_one_parameter_is_larger(monkeypatch, stacking):
    monkeypatch.setattr(adafactor, "_CHUNK", 40)
    chunks = []
    update = Adafactor._update
    monkeypatch.setattr(Adafactor, "_update", lambda self, bs, flagged, dev: chunks.append(
        [q.local.numel() for b in bs for q in b.params]) or update(self, bs, flagged, dev))
    ps = params()
    opt = Adafactor(groups(ps), lr=0.05)
    set_grads(ps, 0)
    opt.step()
    assert sorted(sum(chunks, [])) == sorted(p.numel() for p in ps)  # every parameter once
    assert all(sum(c) <= 40 or len(c) == 1 for c in chunks) and len(chunks) > 2, chunks


def test_same_shape_parameters_share_their_launches(monkeypatch):
    """A step over 16 matrices and 16 vectors of one shape each issues about as many ops as over one of
    each (they are updated as stacked tensors; one at a time it was ~17 ops a matrix, ~6 a vector): the
    host's dispatch per step stays flat in the model's depth."""
    from bench.optimizer import aten_ops

    monkeypatch.setattr(adafactor, "STACK_DEVICES", ("cpu",))

    def ops(n):
        ps = [torch.randn(6, 5).requires_grad_() for _ in range(n)] + [torch.randn(7).requires_grad_() for _ in range(n)]
        opt = Adafactor(ps, lr=0.01)
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()                      # the first step creates the state
        return aten_ops(opt.step)

    one, many = ops(1), ops(16)
    assert many <= one + 16, (one, many)   # the per-parameter step-count scalars and views, not ~23 ops each
