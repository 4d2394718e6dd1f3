"""Training library: optimizer groups, lr scaling and schedule, atomic checkpoints, exact resumption, faults.

Uses the real GroupViT and loss at a micro size (about 0.1 M parameters, 32 px), fed from in-memory batches; the
torchrun, loader and MLflow paths are in test_train_stage.py.
"""
from __future__ import annotations

import itertools
import math
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from groupvit.losses import GroupViTLoss
from groupvit.model import GroupViT, ModelConfig
from groupvit.training import DistInfo, NonFiniteLossError, TrainConfig, TrainResult, WarmupCosine, fit, param_groups
from groupvit.training import checkpointing as ckpt
from groupvit.training.optim import build_optimizer

MICRO = dict(preset="tiny", context_length=12, vocab_size=512, image_size=32, patch_size=8, embed_dim=32,
             depths=(1, 1, 1), num_heads=(2, 2, 2), num_group_tokens=(4, 2, 0), num_output_groups=(4, 2),
             text_width=32, text_layers=1, text_heads=2, output_dim=32, proj_hidden_dim=64, drop_path_rate=0.1)
BATCH = 4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread is fastest and does not fight the other tests for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def micro_model(seed: int = 0) -> GroupViT:
    torch.manual_seed(seed)
    return GroupViT(ModelConfig(**MICRO))


def batches(epoch: int, n: int = 3, offset: int = 0):
    """Deterministic in-memory micro-batches of epoch `epoch` (pixels [B,3,32,32], tokens [B,1+3,12])."""
    g = torch.Generator().manual_seed(1000 + epoch)
    for _ in range(n):
        pixels = torch.randn(BATCH, 3, 32, 32, generator=g)
        tokens = torch.randint(1, 500, (BATCH, 4, 12), generator=g)
        tokens[:, :, -3:] = 0  # padding after the EOT position
        tokens[:, :, 8] = 511
        yield pixels, tokens


def train_cfg(**kw) -> TrainConfig:
    base = dict(steps=6, batch_size=BATCH, lr=1e-3, warmup_lr=1e-4, min_lr=1e-5, lr_base_batch=BATCH,
                warmup_steps=2, precision="fp32", log_every=1, ckpt_every=2, threads=1)
    return TrainConfig(**{**base, **kw})


def run(model, cfg, tmp_path=None, source=batches, loss=None, **kw):
    return fit(model, loss or GroupViTLoss(multi_label=True), source, cfg=cfg, steps_per_epoch=3,
               info=DistInfo(), device=torch.device("cpu"), seed=0, checkpoint_dir=tmp_path, progress=False, **kw)


def params_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---- optimizer and schedule ---------------------------------------------------------------------------------------

def test_decay_exemptions_follow_the_reference():
    model = micro_model()
    decay, exempt = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempted = {names[id(p)] for p in exempt["params"]}
    assert decayed | exempted == set(names.values()) and not decayed & exempted
    assert {"logit_scale", "multi_label_logit_scale", "img_encoder.pos_embed"} <= decayed  # 0-dim and tokens decay
    assert any("token_embedding" in n for n in decayed) and any("group_token" in n for n in decayed)
    assert all(n.endswith(".bias") or model.get_parameter(n).ndim == 1 for n in exempted)
    assert any(n.endswith(".weight") and "norm" in n for n in exempted)  # LayerNorm weights are 1-D
    assert decay["weight_decay"] == 0.05 and exempt["weight_decay"] == 0.0
    opt = build_optimizer(model, 1e-3, 0.05)
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8


def _adamw_steps(impl: str, steps: int = 5) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Parameters and clipped gradients after `steps` AdamW steps on fixed random gradients."""
    model = micro_model()
    opt = build_optimizer(model, 1e-2, 0.05, impl)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g) * 3
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0, foreach=impl != "for_loop")
        opt.step()
    return [p.detach().clone() for p in model.parameters()], [p.grad.clone() for p in model.parameters()]


def test_foreach_adamw_and_clipping_are_bit_identical_to_the_per_parameter_loop_and_fused_rounds_close():
    plain, plain_grads = _adamw_steps("for_loop")
    for impl in ("auto", "foreach"):  # auto = foreach on CPU: the trained weights (and dvc.lock) do not move
        params, grads = _adamw_steps(impl)
        assert all(torch.equal(a, b) for a, b in zip(params, plain, strict=True)), impl
        assert all(torch.equal(a, b) for a, b in zip(grads, plain_grads, strict=True)), impl
    fused, _ = _adamw_steps("fused")
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="optimizer impl must be one of"):
        build_optimizer(micro_model(), 1e-3, 0.05, "apex")


def test_the_default_optimizer_trains_the_weights_of_the_per_parameter_loop_bit_for_bit():
    plain, fast = micro_model(), micro_model()
    run(plain, train_cfg(precision="bf16", optimizer_impl="for_loop"))
    run(fast, train_cfg(precision="bf16"))  # auto: foreach AdamW, foreach clipping
    assert all(torch.equal(a, b) for a, b in zip(params_of(plain).values(), params_of(fast).values(), strict=True))


def test_learning_rate_scales_with_the_global_batch():
    assert TrainConfig(batch_size=256).lr_factor(16) == 1.0  # the paper: 256 x 16 GPUs = 4096
    assert TrainConfig(batch_size=64, grad_accum=2).lr_factor(4) == pytest.approx(512 / 4096)
    with pytest.raises(ValueError, match="nproc"):
        TrainConfig(nproc="many")


def test_warmup_then_per_step_cosine_to_the_minimum():
    s = WarmupCosine(base_lr=1.0, min_lr=0.1, warmup_lr=0.0, warmup_steps=10, total_steps=100)
    assert s(0) == 0.0 and s(5) == pytest.approx(0.5)  # linear warm-up from warmup_lr
    # timm's warmup_prefix=False: the cosine runs over the whole length from step 0
    assert s(10) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.1)))
    assert s(55) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.55)))
    assert s(100) == pytest.approx(0.1) and s(150) == pytest.approx(0.1)
    after = [s(t) for t in range(10, 101)]
    assert all(a >= b for a, b in itertools.pairwise(after))


# ---- checkpoints --------------------------------------------------------------------------------------------------

def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    ckpt.save_checkpoint(tmp_path, 1, {"rng": [ckpt.rng_state()]})
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    state = torch.load(tmp_path / "step_000001.pt", weights_only=True)
    ckpt.set_rng_state(state["rng"][0])
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_checkpoints_rotate_and_latest_points_at_the_newest(tmp_path):
    for step in (2, 4, 6):
        ckpt.save_checkpoint(tmp_path, step, {"step": step, "w": torch.full((2,), float(step))}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000004.pt", "step_000006.pt"]
    assert (tmp_path / "latest").read_text().strip() == "step_000006.pt"
    assert ckpt.load_latest(tmp_path)["step"] == 6


def test_failed_checkpoint_write_leaves_the_previous_one_intact(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 2, {"step": 2})
    before = (tmp_path / "step_000002.pt").read_bytes()

    def full_disk(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space"):
        ckpt.save_checkpoint(tmp_path, 4, {"step": 4})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000002.pt"]  # no temp file left
    assert (tmp_path / "step_000002.pt").read_bytes() == before
    assert ckpt.load_latest(tmp_path)["step"] == 2


def test_a_checkpoint_write_removes_the_temporary_a_killed_writer_left(tmp_path):
    """Checkpoints go through groupvit.atomic: a `kill -9` between write and rename leaves `.<name>.tmp<pid>`; the
    next checkpoint removes it, so a stale half-written file never piles up beside the checkpoints."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead = int(gone.stdout)  # the pid of a process that has exited
    (tmp_path / f".step_000002.pt.tmp{dead}").write_bytes(b"half a checkpoint")
    (tmp_path / f".latest.tmp{dead}").write_text("step_0")
    ckpt.save_checkpoint(tmp_path, 2, {"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000002.pt"]


def test_an_unreadable_latest_checkpoint_falls_back_to_the_previous(tmp_path):
    ckpt.save_checkpoint(tmp_path, 2, {"step": 2})
    ckpt.save_checkpoint(tmp_path, 4, {"step": 4})
    (tmp_path / "step_000004.pt").write_bytes(b"truncated by a copy")
    assert ckpt.load_latest(tmp_path)["step"] == 2
    assert ckpt.load_latest(tmp_path / "missing") is None


# ---- the loop -----------------------------------------------------------------------------------------------------

def test_training_logs_scaled_rates_and_checkpoints(tmp_path):
    logged = []
    cfg = train_cfg(batch_size=BATCH, lr_base_batch=2 * BATCH)  # global batch 4 at reference 8: rates halve
    result = run(micro_model(), cfg, tmp_path, log_fn=lambda s, m: logged.append((s, m)))
    assert result.step == result.planned_steps == 6 and len(result.curve) == 6
    assert [s for s, _ in logged] == [1, 2, 3, 4, 5, 6]
    sched = WarmupCosine(5e-4, 5e-6, 5e-5, 2, 6)
    assert [m["lr"] for _, m in logged] == pytest.approx([sched(s) for s in range(6)])
    m = logged[-1][1]
    assert {"loss", "loss_itc", "loss_ml", "logit_scale", "ml_logit_scale", "grad_norm", "images_per_s"} <= set(m)
    assert m["loss"] == pytest.approx(m["loss_itc"] + m["loss_ml"], rel=1e-5)
    assert m["logit_scale"] == pytest.approx(1 / 0.07, rel=0.05)
    state = ckpt.load_latest(tmp_path / "checkpoints")
    assert state["step"] == 6 and state["planned_steps"] == 6 and state["plan_fixed"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_000004.pt",
                                                                            "step_000006.pt"]


def test_gradient_accumulation_consumes_grad_accum_batches_per_step(tmp_path):
    seen = []

    def counting(epoch):
        for b in batches(epoch, n=6):
            seen.append(epoch)
            yield b

    model = micro_model()
    result = fit(model, GroupViTLoss(True), counting, cfg=train_cfg(grad_accum=2, steps=4), steps_per_epoch=3,
                 info=DistInfo(), device=torch.device("cpu"), seed=0, progress=False)
    assert result.step == 4 and seen == [0] * 6 + [1] * 2


class Interrupted(Exception):
    pass


def test_a_killed_and_resumed_run_ends_where_an_uninterrupted_run_ends(tmp_path):
    full = micro_model()
    run(full, train_cfg(), tmp_path / "full")

    def dies_after_five_steps(epoch):  # 3 steps per epoch: dies in epoch 1 at step 5, after the step-4 checkpoint
        for i, b in enumerate(batches(epoch)):
            if epoch == 1 and i == 2:
                raise Interrupted
            yield b

    with pytest.raises(Interrupted):
        run(micro_model(), train_cfg(), tmp_path / "resumed", source=dies_after_five_steps)
    assert ckpt.load_latest(tmp_path / "resumed" / "checkpoints")["step"] == 4
    resumed = micro_model(seed=123)  # a different initialisation: everything must come from the checkpoint
    result = run(resumed, train_cfg(), tmp_path / "resumed")
    assert result.resumed_from == 4 and result.step == 6
    a, b = params_of(full), params_of(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    assert [r["step"] for r in result.curve] == [1, 2, 3, 4, 5, 6]  # the loss curve survives the restart


def test_a_resumed_run_steps_with_its_own_optimizer_kernels_not_the_checkpoints(tmp_path, monkeypatch):
    """train.optimizer_impl may change on resume; load_state_dict alone would restore the checkpoint's flags."""
    def dies_in_epoch_one(epoch):
        for i, b in enumerate(batches(epoch)):
            if epoch == 1 and i == 2:
                raise Interrupted
            yield b

    with pytest.raises(Interrupted):
        run(micro_model(), train_cfg(optimizer_impl="for_loop"), tmp_path, source=dies_in_epoch_one)
    seen, step = [], torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        seen.append({(g["foreach"], g["fused"]) for g in self.param_groups})
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    result = run(micro_model(), train_cfg(optimizer_impl="fused"), tmp_path)
    assert result.resumed_from == 4 and seen == [{(None, True)}] * 2


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    inner = GroupViTLoss(True)
    calls = []

    def nan_from_step_five(outputs, *a, **k):
        losses = inner(outputs, *a, **k)
        calls.append(1)
        if len(calls) >= 5:
            losses = {key: v * float("nan") for key, v in losses.items()}
        return losses

    with pytest.raises(NonFiniteLossError, match="NaN or infinite between steps 4 and 5"):
        run(micro_model(), train_cfg(steps=8), tmp_path, loss=nan_from_step_five)
    state = ckpt.load_latest(tmp_path / "checkpoints")
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (tmp_path / "checkpoints" / "step_000006.pt").exists()


def test_a_failed_periodic_checkpoint_keeps_the_previous_and_training_goes_on(tmp_path, monkeypatch, caplog):
    real_save = torch.save
    calls = []

    def fails_once(obj, f, *a, **k):
        calls.append(obj["step"])
        if obj["step"] == 4:
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", fails_once)
    result = run(micro_model(), train_cfg(), tmp_path)
    assert result.step == 6 and calls == [2, 4, 6]
    assert "checkpoint of step 4 failed" in caplog.text
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_000002.pt",
                                                                            "step_000006.pt"]


def test_a_time_budget_fixes_the_plan_in_the_checkpoint(tmp_path):
    cfg = train_cfg(steps=50, max_minutes=1e-4, ckpt_every=100)  # 6 ms: the plan shrinks to the timed steps
    result = run(micro_model(), cfg, tmp_path)
    assert result.planned_steps < 50 and result.step == result.planned_steps
    state = ckpt.load_latest(tmp_path / "checkpoints")
    assert state["plan_fixed"] and state["planned_steps"] == result.planned_steps
    assert state["schedule"]["total_steps"] == result.planned_steps  # the cosine is laid over the fitted plan


def test_the_budget_probe_skips_the_slow_first_steps():
    """Loader workers and tracking threads make the first steps slow; timing them planned a third fewer steps than
    the budget allowed. Here (on the injected clock) the first 4 steps take 0.25 s each and the rest 5 ms: a 3.6 s
    budget fits all 40 (timing steps 2-6 instead would measure 0.152 s/step and plan 21)."""
    clock = FakeClock(0.005)

    def slow_start(epoch):
        for i, b in enumerate(clock.batches(epoch)):
            if epoch * 3 + i < 4:  # the batches of steps 1-4 (3 per epoch)
                clock.now += 0.245
            yield b

    result = run(micro_model(), train_cfg(steps=40, max_minutes=0.06, ckpt_every=100, log_every=100),
                 source=slow_start, clock=clock)
    assert result.planned_steps == 40 and result.step == 40 and not result.stopped_by_budget


def test_a_budget_that_fits_trains_exactly_the_unbudgeted_run():
    """The default pipeline relies on this: a cap that never bites leaves the plan, the schedule and therefore the
    weights as without a budget, so every `dvc repro` on a fast enough machine trains the same model."""
    plain, capped = micro_model(), micro_model()
    a = run(plain, train_cfg(steps=12, ckpt_every=100))
    b = run(capped, train_cfg(steps=12, max_minutes=10.0, ckpt_every=100))
    assert a.planned_steps == b.planned_steps == 12 and b.step == 12
    capped_params = params_of(capped)
    for name, value in params_of(plain).items():
        assert torch.equal(value, capped_params[name]), name


class FakeClock:
    """The time a machine would show: each batch drawn costs `step_s` seconds (no real waiting)."""

    def __init__(self, step_s: float):
        self.now, self.step_s = 0.0, step_s

    def __call__(self) -> float:
        return self.now

    def batches(self, epoch: int):
        for b in batches(epoch):
            self.now += self.step_s
            yield b


def test_the_default_length_does_not_depend_on_how_busy_the_machine_is():
    """params.yaml's `train` section trains a fixed length: a CPU hog (here a minute per step) plans and trains the
    same steps, and ends with the same weights, as an idle machine. With the old 7-minute default cap the busy run
    planned 15 of 20 steps (a fresh clone's make repro beside another job planned 62 of 625 and lost 52 mIoU)."""
    from groupvit.config import load_section

    default = load_section(TrainConfig, "params.yaml", "train")
    cfg = train_cfg(steps=20, ckpt_every=100, log_every=100, max_minutes=default.max_minutes)
    idle, busy, clock = micro_model(), micro_model(), FakeClock(60.0)
    a = run(idle, cfg)
    b = run(busy, cfg, source=clock.batches, clock=clock)
    assert a.planned_steps == b.planned_steps == 20 and a.step == b.step == 20 and not b.stopped_by_budget
    busy_params = params_of(busy)
    for name, value in params_of(idle).items():
        assert torch.equal(value, busy_params[name]), name


def test_a_budget_the_user_asks_for_plans_from_the_measured_step_time():
    """With `max_minutes` set, the plan is what fits: at 0.5 s per step a 1-minute budget plans 15 steps, then 90% of
    the 52.5 s left at the probe's 0.5 s/step, 109 in all, and finishes them in time."""
    clock = FakeClock(0.5)
    result = run(micro_model(), train_cfg(steps=1000, max_minutes=1.0, ckpt_every=1000, log_every=1000),
                 source=clock.batches, clock=clock)
    assert result.planned_steps == 15 + int(0.9 * (60 - 15 * 0.5) / 0.5) == 109
    assert result.step == 109 and not result.stopped_by_budget


def test_a_finished_or_reconfigured_run_starts_afresh_instead_of_resuming(tmp_path):
    first = run(micro_model(), train_cfg(steps=4), tmp_path, run_config={"train.lr": 1e-3})
    again = run(micro_model(), train_cfg(steps=4), tmp_path, run_config={"train.lr": 1e-3})
    assert first.resumed_from is None and again.resumed_from is None and again.step == 4  # finished: train again
    assert (tmp_path / "checkpoints_previous/step_000004.pt").is_file()

    def dies_at_step_three(epoch):
        for i, b in enumerate(batches(epoch)):
            if i == 2:
                raise Interrupted
            yield b

    with pytest.raises(Interrupted):
        run(micro_model(), train_cfg(steps=4), tmp_path, source=dies_at_step_three, run_config={"train.lr": 1e-3})
    changed = run(micro_model(), train_cfg(steps=4), tmp_path, run_config={"train.lr": 2e-3})
    assert changed.resumed_from is None and changed.step == 4
    assert ckpt.load_latest(tmp_path / "checkpoints_previous")["step"] == 2  # the interrupted run, set aside
    assert ckpt.load_latest(tmp_path / "checkpoints")["config"] == {"train.lr": 2e-3}


# ---- the run's summaries ------------------------------------------------------------------------------------------

def test_the_summary_says_whether_the_length_or_a_budget_planned_the_steps():
    result = TrainResult(step=5, planned_steps=5, final_loss=1.25, images_per_s=12.34567, wall_s=3.21,
                         stopped_by_budget=False, resumed_from=None,
                         curve=[{"step": 2, "loss": 2.123456789, "loss_itc": 1.0, "loss_ml": 1e-7,
                                 "lr": 0.00012345678}])
    cfg = train_cfg(steps=0, epochs=2.0, max_minutes=0, grad_accum=2)
    assert result.full_steps(cfg, steps_per_epoch=3) == 6
    summary = result.summary(cfg, steps_per_epoch=3, world_size=2)
    assert summary == {"final_loss": 1.25, "steps": 5, "planned_steps": 5, "planned_by": "time budget",
                       "max_minutes": 0.0, "images_per_s": 12.346, "wall_s": 3.2, "stopped_by_budget": False,
                       "world_size": 2, "global_batch": BATCH * 2 * 2}
    assert result.summary(cfg, steps_per_epoch=2, world_size=1)["planned_by"] == "length"  # 2 epochs of 2 steps
    assert result.curve_csv() == "step,loss,loss_itc,loss_ml,lr\n2,2.12346,1,1e-07,0.000123457\n"
