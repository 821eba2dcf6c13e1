"""Self-distillation and frozen teachers on tiny models, without Ray: each teacher's logits at a
step are those of the right snapshot of the student, and its state survives a checkpoint."""
from __future__ import annotations

import io
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from online_distill.rundir import checkpoint as ckpt
from online_distill.config import schema as C
from online_distill.config import files as CF
from online_distill.distill.losses import distill_loss
from online_distill.core.optim import cycle_index, lr_factor, make_optimizer, make_scheduler
from online_distill.teachers import TEACHERS, TeacherContext, build_teacher
from online_distill.teachers.ema import ema_decay_at
from online_distill.rundir.layout import checkpoint_dir_of as find_checkpoint_dir
from online_distill.teachers.frozen import resolve_teacher
from online_distill.teachers.snapshot import is_cycle_end
from online_distill.core.topology import Topology
from online_distill.run.checks import check

IMAGES = torch.zeros(2, 1, 28, 28)  # what models are built for: a batch like the 1x28x28 data


@pytest.fixture(autouse=True)
def one_thread():
    """The machine is small and shared: one intra-op thread keeps these tiny nets from contending."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_net(in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """Conv + BatchNorm + linear: parameters, float buffers and an integer buffer."""
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, num_classes))


def context(cfg: C.Config, steps_per_epoch: int = 4) -> TeacherContext:
    def build_peer(p: int) -> nn.Module:
        torch.manual_seed(cfg.train.seed * 1000 + p)
        return tiny_net()

    return TeacherContext(cfg, Topology(rank=0, num_peers=1, replicas=1), torch.device("cpu"), build_peer,
                          steps_per_epoch, build_model=lambda name: tiny_net())


def peer_source(ctx: TeacherContext):
    """The chosen mode's source for peer 0, as the worker's per-peer wrapper holds it."""
    return TEACHERS[ctx.cfg.distill.mode].source(ctx, 0)


def train_steps(model, teacher, cfg, steps, steps_per_epoch=4, probe=None):
    """A plain version of the loop's step; returns the student state after each step and the
    teacher logits the loop would have used at each step on `probe` (after that step's update)."""
    opt = make_optimizer(cfg.optim, model)
    sched = make_scheduler(cfg.optim, opt, steps_per_epoch, cfg.train.epochs)
    g = torch.Generator().manual_seed(0)
    states, seen = [], []
    for step in range(steps):
        x, y = torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
        x, y = teacher.prepare_batch(x, y)
        z = model(x)
        t = teacher.logits(x, z)
        loss, _ = distill_loss(z, t, y, temperature=2.0, kd_weight=0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        teacher.after_step(model, step)
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        if probe is not None:
            out = teacher.logits(probe, model(probe))
            seen.append(None if out is None else out.clone())
    return states, seen


def base_cfg(**over) -> C.Config:
    raw = {"models": ["tiny_cnn"], "data": {"dataset": "synthetic", "val_size": 500}, "optim": {"lr": 0.1, "schedule": "constant"},
           "train": {"epochs": 3, "batch_size": 8}}
    return C.with_overrides(C.from_dict(raw), over)


def roundtrip(state: dict) -> dict:
    """Through torch.save and a weights-only load, exactly as checkpoints go."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# --- EMA -----------------------------------------------------------------------------------------

def test_ema_decay_warms_up_then_holds():
    assert ema_decay_at(0, 0.999, 100) == pytest.approx(0.1)
    assert ema_decay_at(90, 0.999, 100) == pytest.approx(91 / 100)
    assert ema_decay_at(100, 0.999, 100) == 0.999
    assert ema_decay_at(20, 0.5, 100) == 0.5  # never above the configured decay
    assert ema_decay_at(0, 0.9, 0) == 0.9


@pytest.mark.parametrize("warmup", [0, 3])
def test_ema_weights_are_the_closed_form_average_of_the_student_weights(warmup):
    cfg = base_cfg(**{"distill.mode": "ema", "distill.ema_decay": 0.8, "distill.ema_warmup_steps": warmup})
    ctx = context(cfg)
    model = ctx.build_peer(0)
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    teacher = peer_source(ctx)
    n = 6
    states, _ = train_steps(model, teacher, cfg, n)
    decays = [ema_decay_at(k, 0.8, warmup) for k in range(n)]
    ema = teacher.model.state_dict()
    for name, t in ema.items():
        if not t.is_floating_point():  # counters are copied, not averaged
            assert torch.equal(t, states[-1][name]), name
            continue
        # EMA_n = prod(d_k) w_0 + sum_k (1 - d_k) prod_{j > k} d_j w_{k+1}
        expected = torch.tensor(decays).prod() * w0[name]
        for k in range(n):
            expected = expected + (1 - decays[k]) * torch.tensor(decays[k + 1:]).prod() * states[k][name]
        torch.testing.assert_close(t, expected, rtol=1e-5, atol=1e-6, msg=name)
    assert any(name.endswith("running_var") for name in ema)  # BatchNorm statistics were averaged too
    # the teacher's logits are those of that average, in eval mode, without gradients
    reference = tiny_net()
    reference.load_state_dict(ema)
    x = torch.randn(5, 1, 8, 8)
    out = teacher.logits(x, model(x))
    assert out.shape == (1, 5, 10) and not out.requires_grad
    torch.testing.assert_close(out[0], reference.eval()(x))


def test_ema_state_survives_a_checkpoint():
    cfg = base_cfg(**{"distill.mode": "ema", "distill.ema_decay": 0.5})
    ctx = context(cfg)
    model = ctx.build_peer(0)
    teacher = peer_source(ctx)
    train_steps(model, teacher, cfg, 3)
    fresh = peer_source(ctx)
    fresh.load_state_dict(roundtrip(teacher.state_dict()))
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(fresh.logits(x, model(x)), teacher.logits(x, model(x)))
    assert fresh.updates == 3
    # and a fresh teacher that was not restored is a different one (the test can fail)
    assert not torch.equal(peer_source(ctx).logits(x, model(x)), teacher.logits(x, model(x)))


# --- snapshot ------------------------------------------------------------------------------------

def test_snapshot_teacher_changes_only_at_cycle_ends_and_is_the_last_snapshot():
    spe, epochs, cycles = 4, 3, 3  # 12 steps, cycles of 4: snapshots after steps 3 and 7 (not 11, the end)
    cfg = base_cfg(**{"distill.mode": "snapshot", "optim.schedule": "cyclic", "optim.cycles": cycles,
                      "train.epochs": epochs})
    ctx = context(cfg, steps_per_epoch=spe)
    model = ctx.build_peer(0)
    teacher = peer_source(ctx)
    probe = torch.randn(6, 1, 8, 8)
    states, seen = train_steps(model, teacher, cfg, spe * epochs, steps_per_epoch=spe, probe=probe)
    assert [s for s in range(12) if is_cycle_end(s, cfg, spe)] == [3, 7]
    # seen[s]: the teacher's logits after step s, i.e. what step s + 1 distils from
    assert all(seen[s] is None for s in range(3))  # first cycle: labels only
    for taken, until in ((3, 7), (7, 12)):
        reference = tiny_net()
        reference.load_state_dict(states[taken])
        for s in range(taken, until):  # from the snapshot on, through the whole cycle it teaches
            torch.testing.assert_close(seen[s][0], reference.eval()(probe))
    assert not torch.equal(seen[3], seen[7])
    # the snapshots sit where the cyclic LR restarts
    assert [s for s in range(1, 12) if lr_factor(s, cfg.optim, spe, epochs) == 1.0] == [4, 8]
    restored = peer_source(ctx)
    restored.load_state_dict(roundtrip(teacher.state_dict()))
    assert restored.taken_at_step == 7 and torch.equal(restored.logits(probe, None), teacher.logits(probe, None))


def test_snapshot_cycle_ends_follow_the_schedule_when_cycles_do_not_divide_the_steps():
    cfg = base_cfg(**{"distill.mode": "snapshot", "optim.schedule": "cyclic", "optim.cycles": 3, "train.epochs": 2})
    ends = [s for s in range(10) if is_cycle_end(s, cfg, 5)]
    assert ends == [s for s in range(9) if cycle_index(s + 1, cfg.optim, 5, 2) > cycle_index(s, cfg.optim, 5, 2)]
    assert len(ends) == 2


def test_snapshot_needs_a_cyclic_schedule():
    with pytest.raises(C.ConfigError, match=r"optim.schedule: got 'cosine'; allowed: 'cyclic'"):
        check(base_cfg(**{"distill.mode": "snapshot", "optim.schedule": "cosine"}))
    with pytest.raises(C.ConfigError, match=r"optim.cycles: got 1"):
        check(base_cfg(**{"distill.mode": "snapshot", "optim.schedule": "cyclic"}))


# --- DLB -----------------------------------------------------------------------------------------

def test_dlb_repeats_the_last_batch_and_targets_last_steps_predictions():
    cfg = base_cfg(**{"distill.mode": "dlb"})
    ctx = context(cfg)
    teacher = peer_source(ctx)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 1, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(3)]
    logits_seen = []
    for i, (x, y) in enumerate(batches):
        bx, by = teacher.prepare_batch(x, y)
        z = torch.randn(len(bx), 10, generator=g, requires_grad=True)  # stand-in student outputs of this step
        t = teacher.logits(bx, z)
        if i == 0:
            assert torch.equal(bx, x) and t is None  # nothing to repeat yet: labels only
        else:
            prev_x, prev_y = batches[i - 1]
            assert torch.equal(bx, torch.cat([x, prev_x])) and torch.equal(by, torch.cat([y, prev_y]))
            # repeated rows: the predictions made for them one step ago, when they were fresh
            assert torch.equal(t[0, 4:], logits_seen[i - 1][:4])
            # fresh rows target themselves: no KD gradient reaches them, only the CE does
            (grad,) = torch.autograd.grad(_kd(z, t), z)
            assert grad[:4].abs().max() < 1e-7 and grad[4:].abs().max() > 1e-4
        logits_seen.append(z.detach().clone())
    # the memory is in the checkpoint: a restored teacher repeats the same batch with the same targets
    restored = peer_source(ctx)
    restored.load_state_dict(roundtrip(teacher.state_dict()))
    x, y = batches[0]
    bx, _ = restored.prepare_batch(x, y)
    assert torch.equal(bx[4:], batches[2][0])
    assert torch.equal(restored.logits(bx, torch.zeros(8, 10))[0, 4:], logits_seen[2][:4])


def _kd(z, t):
    from online_distill.distill.losses import kd_term

    return kd_term(z, t, temperature=3.0, multi_teacher="mean_kl")


# --- frozen (offline KD) -------------------------------------------------------------------------

@pytest.fixture
def teacher_run(tmp_path):
    """An earlier run of ours on disk: config.yaml and a checkpoint with two peers of different models."""
    cfg = base_cfg(models=["tiny_cnn", "mlp"], **{"distill.mode": "independent"})
    run_dir = tmp_path / "teacher_run"
    d = run_dir / "checkpoint_epoch_0002"
    os.makedirs(d)
    (run_dir / "config.yaml").write_text(CF.dump(cfg))
    from online_distill.models.builders import build_model

    nets = []
    for p, name in enumerate(cfg.models):
        torch.manual_seed(p)
        net = build_model(name, IMAGES, 10)
        opt = make_optimizer(cfg.optim, net)
        ckpt.save(str(d), ckpt.Epoch(1, {}, [], Topology(rank=p, num_peers=2, replicas=1),
                                     [(net, opt, make_scheduler(cfg.optim, opt, 4, 3))], build_teacher(context(cfg))))
        nets.append(net)
    os.makedirs(run_dir / "checkpoint_epoch_0001")  # an older checkpoint: not the one used
    return run_dir, nets


def offline_cfg(path, **over) -> C.Config:
    return base_cfg(**{"distill.mode": "offline", "distill.teacher_checkpoint": str(path), **over})


def test_frozen_teacher_from_a_run_directory_reads_the_model_from_its_config(teacher_run):
    run_dir, nets = teacher_run
    src = resolve_teacher(offline_cfg(run_dir).distill)
    assert src.path.endswith(os.path.join("checkpoint_epoch_0002", "peer0.pt")) and src.model_name == "tiny_cnn"
    assert resolve_teacher(offline_cfg(run_dir, **{"distill.teacher_peer": 1}).distill).model_name == "mlp"
    assert find_checkpoint_dir(str(run_dir / "checkpoint_epoch_0002")).endswith("checkpoint_epoch_0002")
    # a student of another architecture learns from it: eval mode, no gradients, the saved weights
    cfg = offline_cfg(run_dir / "checkpoint_epoch_0002", **{"distill.teacher_peer": 1})
    check(cfg)
    from online_distill.models.builders import build_model

    ctx = context(cfg)
    ctx.build_model = lambda name: build_model(name, IMAGES, 10)
    teacher = peer_source(ctx)
    x = torch.randn(3, 1, 28, 28)
    out = teacher.logits(x, None)
    assert not out.requires_grad and not teacher.model.training
    torch.testing.assert_close(out[0], nets[1].eval()(x))
    assert roundtrip(teacher.state_dict())["model_name"] == "mlp"


def test_frozen_teacher_from_a_plain_state_dict_needs_the_model_name(tmp_path, teacher_run):
    _, nets = teacher_run
    path = tmp_path / "user_weights.pt"
    torch.save(nets[0].state_dict(), path)
    with pytest.raises(C.ConfigError, match=r"distill.teacher_model: got None"):
        check(offline_cfg(path))
    with pytest.raises(C.ConfigError, match=r"distill.teacher_model: unknown model 'nonesuch'; allowed: .*small_cnn"):
        check(offline_cfg(path, **{"distill.teacher_model": "nonesuch"}))
    with pytest.raises(C.ConfigError, match=r"distill.teacher_model: the weights .* do not fit model 'small_cnn'"):
        check(offline_cfg(path, **{"distill.teacher_model": "small_cnn"}))
    check(offline_cfg(path, **{"distill.teacher_model": "tiny_cnn"}))


def test_bad_teacher_checkpoints_are_refused_on_the_driver(tmp_path, teacher_run):
    run_dir, _ = teacher_run
    with pytest.raises(C.ConfigError, match=r"distill.teacher_checkpoint: got None"):
        check(base_cfg(**{"distill.mode": "offline"}))
    with pytest.raises(C.ConfigError, match=r"distill.teacher_checkpoint: .*missing.* does not exist"):
        check(offline_cfg(tmp_path / "missing"))
    with pytest.raises(C.ConfigError, match=r"distill.teacher_peer: got 2; allowed: 0..1"):
        check(offline_cfg(run_dir, **{"distill.teacher_peer": 2}))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(C.ConfigError, match=r"distill.teacher_checkpoint: .* holds no peer<p>.pt files"):
        check(offline_cfg(tmp_path / "empty"))
    torch.save(tiny_net(), tmp_path / "pickled_module.pt")  # code, not data: refused by weights_only
    with pytest.raises(C.ConfigError, match=r"distill.teacher_checkpoint: .* is not a weights-only checkpoint"):
        check(offline_cfg(tmp_path / "pickled_module.pt", **{"distill.teacher_model": "tiny_cnn"}))


def test_born_again_is_refused_without_a_second_generation_or_with_several_models():
    with pytest.raises(C.ConfigError, match=r"distill.generations: got 1; allowed: an integer >= 2"):
        check(base_cfg(**{"distill.mode": "born_again", "distill.generations": 1}))
    with pytest.raises(C.ConfigError, match=r"models: got \['tiny_cnn', 'tiny_cnn'\]; allowed: one model"):
        check(base_cfg(models=["tiny_cnn", "tiny_cnn"], **{"distill.mode": "born_again"}))


def test_the_kd_term_of_a_teacher_equal_to_the_student_has_no_gradient():
    # what DLB's fresh rows rely on: KL(p || p) = 0 and so is its gradient
    z = torch.randn(5, 10, requires_grad=True)
    kd = _kd(z, z.detach().unsqueeze(0))
    (g,) = torch.autograd.grad(kd, z)
    assert kd.item() == pytest.approx(0.0, abs=1e-7) and g.abs().max() < 1e-7
    assert F.kl_div(F.log_softmax(z, 1), F.softmax(z.detach(), 1), reduction="batchmean").abs() < 1e-6


def test_a_cached_frozen_teacher_teaches_the_same_and_runs_once_per_example(teacher_run, train_history, monkeypatch):
    run_dir, _ = teacher_run
    over = {"data.train_subset": 96, "data.val_size": 32, "data.test_subset": 32, "train.epochs": 3,
            "train.batch_size": 16, "distill.teacher_model": "mlp", "distill.teacher_peer": 1}
    plain = train_history(offline_cfg(run_dir, **over))
    from online_distill.teachers import frozen

    seen = []
    real_get = frozen.LogitCache.get

    def counting_get(self, x, teacher):
        return real_get(self, x, lambda rows: (seen.append(len(rows)), teacher(rows))[1])

    monkeypatch.setattr(frozen.LogitCache, "get", counting_get)
    cached = train_history(offline_cfg(run_dir, **over, **{"distill.cache_teacher": True}))
    assert sum(seen) == 96 - 96 % 16  # every training example through the teacher once, over 3 epochs
    for a, b in zip(plain, cached):
        assert a.keys() == b.keys()
        for k in {"train_ce", "train_kd", "val_acc", "test_acc"} & a.keys():
            assert a[k] == pytest.approx(b[k], abs=1e-5), (a["epoch"], a["member"], k)


def test_a_teacher_cache_is_refused_where_logits_change():
    with pytest.raises(C.ConfigError, match=r"distill.cache_teacher: got True; allowed: false with distill.mode='dml'"):
        base_cfg(models=["tiny_cnn", "tiny_cnn"], **{"distill.mode": "dml", "distill.cache_teacher": True}).check_fields()
    with pytest.raises(C.ConfigError, match=r"distill.cache_teacher: got True; allowed: false with data.shift or data.flip"):
        offline_cfg("x", **{"distill.cache_teacher": True, "data.shift": 2}).check_fields()
