"""Nothing is lost: exact resume after SIGKILL, atomic checkpoints, a full disk, non-finite
steps, and checkpoints that do not fit the run."""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch

from herd.callbacks.nonfinite import NonFiniteGuard, NonFiniteLossError, OutOfMemoryStop
from herd.data.sampling import ResumableShuffleSampler
from herd.errors import ConfigError
from herd.train import resume_checkpoint, train
from herd.utils.checkpoint_io import CheckpointWriteError, atomic_torch_save

from .conftest import FAST, REPO, compose_cfg, run_cli
from .helpers.crash import herd_train_command, kill_at_random_after_checkpoint
from .test_bad_inputs import TINY_VISION
from .test_fusion import TINY_FUSION
from .test_speech import SMALL_ENCODER

SMALL_RUN = [
    *FAST,
    "trainer.max_steps=16",
    "trainer.val_check_interval=4",
    "trainer.limit_val_batches=1",
    "test=false",
    "callbacks.text_samples=null",
    "trainer.log_every_n_steps=1",
]


def recorded_losses(path: Path) -> dict[int, float]:
    losses = {}
    for line in path.read_text().splitlines():  # a resumed run repeats steps: keep the last
        step, loss = line.split()
        losses[int(step)] = float(loss)
    return losses


def recorder(path: Path) -> list[str]:
    return [
        "+callbacks.record._target_=tests.helpers.crash.LossRecorder",
        f"+callbacks.record.path={path}",
    ]


# ----------------------------------------------------------------------------- resume


def test_resumable_sampler_continues_the_stream_and_shards_ranks():
    full = ResumableShuffleSampler(10, seed=3)
    stream = [i for i, _ in zip(full, range(35), strict=False)]
    assert sorted(stream[:10]) == list(range(10)) and stream[:10] != stream[10:20]  # new pass
    resumed = ResumableShuffleSampler(10, seed=3, start=13)
    assert [i for i, _ in zip(resumed, range(22), strict=False)] == stream[13:]
    ranks = [ResumableShuffleSampler(10, seed=3, start=4, rank=r, world_size=2) for r in (0, 1)]
    taken = [[i for i, _ in zip(s, range(3), strict=False)] for s in ranks]
    assert taken[0] == stream[4:10:2] and taken[1] == stream[5:11:2]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_losses(tmp_path):
    logs = tmp_path / "logs"
    straight = run_cli(
        "herd.train",
        *SMALL_RUN,
        *recorder(tmp_path / "straight.txt"),
        f"hydra.run.dir={tmp_path / 'straight'}",
        log_dir=logs,
    )
    assert straight.returncode == 0, straight.stderr[-3000:]

    run_dir = tmp_path / "crashed"
    killed = run_cli(
        "herd.train",
        *SMALL_RUN,
        *recorder(tmp_path / "crashed.txt"),
        "+callbacks.crash._target_=tests.helpers.crash.KillAtStep",
        "+callbacks.crash.step=10",
        f"hydra.run.dir={run_dir}",
        log_dir=logs,
    )
    assert killed.returncode == -signal.SIGKILL
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8

    resumed = run_cli(
        "herd.train",
        *SMALL_RUN,
        *recorder(tmp_path / "crashed.txt"),
        "auto_resume=true",
        f"hydra.run.dir={run_dir}",
        log_dir=logs,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = (
        recorded_losses(tmp_path / "straight.txt"),
        recorded_losses(tmp_path / "crashed.txt"),
    )
    assert sorted(got) == sorted(expected) == list(range(1, 17))
    # pydoc packs into hundreds of rows, so the kill at step 10 is mid-epoch; steps 9..16
    # come from the resumed process
    assert got == expected


# Every stage with its random draws on: augmentation and dropout (vision), speed perturbation
# in 2 DataLoader workers and SpecAugment (speech), speed perturbation and the fused model's
# generation at validation (fusion). Checkpoints every 4 steps; a sanity check on resume.
EVERY_4_STEPS = [
    "trainer.max_steps=14",
    "trainer.val_check_interval=4",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "callbacks.model_summary=null",
    "test=false",
]
STAGES = {
    "vision": [
        *TINY_VISION,
        "data.batch_size=16",
        "++model.encoder.backbone_kwargs.proj_drop_rate=0.2",
    ],
    "speech": [
        "experiment=speech_digits",
        *(f"model.encoder.{k}={v}" for k, v in SMALL_ENCODER.items()),
        "model.encoder.dropout=0.1",
        "data.batch_size=4",
        "data.num_workers=2",
    ],
    "fusion": [*(o for o in TINY_FUSION if not o.startswith("trainer.")), "data.batch_size=4"],
}


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(STAGES))
def test_sigkill_from_outside_then_auto_resume_gives_the_same_losses(stage, tmp_path):
    args = [*STAGES[stage], *EVERY_4_STEPS]
    logs = tmp_path / "logs"
    # the uninterrupted run in this process (a fresh process gives the same numbers: see
    # test_sweeps' reproduction test); the crashed and resumed ones as a user runs them
    train(compose_cfg("train", [*args, *recorder(tmp_path / "straight.txt")], logs / "straight"))

    run_dir = tmp_path / "crashed"
    env = {**os.environ, "HERD_LOG_DIR": str(logs), "PYTHONWARNINGS": "ignore"}
    command = herd_train_command(
        *args, *recorder(tmp_path / "crashed.txt"), f"hydra.run.dir={run_dir}"
    )
    killed_at = kill_at_random_after_checkpoint(
        command, env, REPO, tmp_path / "crashed.txt", after=4, before=14
    )
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]

    resumed = run_cli(
        "herd.train",
        *args,
        *recorder(tmp_path / "resumed.txt"),
        "auto_resume=true",
        f"hydra.run.dir={run_dir}",
        log_dir=logs,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = recorded_losses(tmp_path / "straight.txt")
    before = recorded_losses(tmp_path / "crashed.txt")
    after = recorded_losses(tmp_path / "resumed.txt")
    assert min(after) == saved + 1  # it resumed from the checkpoint, not from scratch
    got = {**before, **after}
    assert sorted(got) == sorted(expected) == list(range(1, 15))
    worst = max(abs(got[s] - expected[s]) for s in expected)
    assert got == expected, f"{stage}: killed after step {killed_at}, max |diff| {worst}"


@pytest.mark.slow
def test_sigkill_while_saving_leaves_the_previous_last_ckpt_loadable(tmp_path):
    run_dir = tmp_path / "run"
    killed = run_cli(
        "herd.train",
        *SMALL_RUN,
        "+callbacks.crash._target_=tests.helpers.crash.KillDuringSave",
        "+callbacks.crash.save=3",
        f"hydra.run.dir={run_dir}",
        log_dir=tmp_path / "logs",
    )
    assert killed.returncode == -signal.SIGKILL
    last = run_dir / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)  # whole, not the half-written file
    assert state["global_step"] in (4, 8) and "state_dict" in state
    leftovers = list((run_dir / "checkpoints").glob(".*.tmp-*"))
    assert leftovers and all(p.stat().st_size < 100 for p in leftovers)  # only the temp was cut


def test_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1}, path)

    def no_space(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(
        CheckpointWriteError, match=r"the disk is full; the previous checkpoint there is intact"
    ):
        atomic_torch_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert list(tmp_path.iterdir()) == [path]  # the temporary file is gone


def test_resume_refuses_checkpoints_of_other_settings_or_systems(train_cfg, tmp_path):
    cfg = train_cfg("trainer.max_steps=2", "trainer.val_check_interval=2", "test=false")
    train(cfg)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert resume_checkpoint(train_cfg(f"ckpt_path={last}")) == str(last)
    other = train_cfg(f"ckpt_path={last}", "model.llama.n_layers=3", "model.llama.dim=96")
    with pytest.raises(ConfigError, match=r"model.llama.dim=None \(checkpoint\) vs 96.*n_layers"):
        resume_checkpoint(other)
    with pytest.raises(ConfigError, match="ckpt_path=last but .* does not exist"):
        resume_checkpoint(compose_cfg("train", ["ckpt_path=last"], tmp_path / "new"))
    assert resume_checkpoint(compose_cfg("train", ["auto_resume=true"], tmp_path / "new")) is None


# ----------------------------------------------------------------------------- non-finite


class PoisonGradients(L.Callback):
    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step == self.at_step:
            next(pl_module.parameters()).grad[0, 0] = float("nan")


def _tiny_fit(tmp_path, guard, max_steps=4, inject=None, extra_callbacks=(), **trainer_args):
    from herd.data.text import TextDataModule
    from herd.systems.language import LanguageSystem

    torch.manual_seed(0)
    system = LanguageSystem(
        llama={"flavor": "tiny", "max_seq_len": 64},
        tokenizer="bytes",
        optimizer={"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3},
    )
    data = TextDataModule(tokenizer="bytes", seq_len=64, batch_size=2, source="pydoc")
    snapshots = {}

    class Snapshot(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            snapshots[trainer.global_step] = [p.detach().clone() for p in pl_module.parameters()]

    trainer = L.Trainer(
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        callbacks=[inject or PoisonGradients(at_step=2), guard, Snapshot(), *extra_callbacks],
        **trainer_args,
    )
    trainer.fit(system, datamodule=data)
    return snapshots


def test_nonfinite_gradients_skip_the_step_and_are_counted(tmp_path):
    guard = NonFiniteGuard(policy="skip")
    snapshots = _tiny_fit(tmp_path, guard)
    assert guard.skipped == 1
    # the poisoned third step changed nothing; the steps around it did
    assert all(torch.equal(a, b) for a, b in zip(snapshots[2], snapshots[3], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[3], snapshots[4], strict=True))
    assert all(torch.isfinite(p).all() for p in snapshots[4])


def test_nonfinite_gradients_stop_the_run_when_asked(tmp_path):
    with pytest.raises(NonFiniteLossError, match="Non-finite loss or gradients at step 2"):
        _tiny_fit(tmp_path, NonFiniteGuard(policy="stop"))
    with pytest.raises(ConfigError, match="policy='never' is not one of"):
        NonFiniteGuard(policy="never")


def test_one_gradient_norm_per_step_serves_the_guard_the_log_and_the_clipping(
    tmp_path, monkeypatch
):
    import herd.systems.common as common

    computed = []
    real_grad_norm = common.grad_norm
    monkeypatch.setattr(common, "grad_norm", lambda m: computed.append(1) or real_grad_norm(m))
    after_clipping = []

    class ReadClippedGradients(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):  # gradients as stepped
            after_clipping.append(float(real_grad_norm(pl_module)))

    _tiny_fit(
        tmp_path,
        NonFiniteGuard(policy="skip"),
        inject=L.Callback(),
        extra_callbacks=[ReadClippedGradients()],
        gradient_clip_val=1e-3,
    )
    assert len(computed) == 4  # four steps: once each
    assert after_clipping == pytest.approx([1e-3] * 4, rel=1e-3)


def test_speech_length_buckets_resume_and_shard_like_the_plain_sampler():
    from herd.data.sampling import LengthBucketBatches

    lengths = [(i * 7919) % 1000 + 100 for i in range(50)]
    stream = [b for b, _ in zip(LengthBucketBatches(lengths, 4, seed=1), range(30), strict=False)]
    per_pass = len(LengthBucketBatches(lengths, 4, seed=1).batches_of_pass(0))
    assert sorted(i for b in stream[:per_pass] for i in b) == sorted(
        set(i for b in stream[:per_pass] for i in b)
    )  # no clip twice in a pass
    resumed = LengthBucketBatches(lengths, 4, seed=1, start=17)
    assert [b for b, _ in zip(resumed, range(13), strict=False)] == stream[17:30]
    rank1 = LengthBucketBatches(lengths, 4, seed=1, start=4, rank=1, world_size=2)
    assert [b for b, _ in zip(rank1, range(3), strict=False)] == stream[5:11:2]


def test_lead_in_batches_come_first_and_resume_inside_or_after_them():
    from herd.data.sampling import LengthBucketBatches

    lengths = [(i * 7919) % 1000 + 100 for i in range(40)]
    lead = [[40, 41, 42, 43], [44, 45, 46, 47], [48, 49, 50, 51]]
    plain = [b for b, _ in zip(LengthBucketBatches(lengths, 4, seed=1), range(10), strict=False)]
    stream = [
        b
        for b, _ in zip(
            LengthBucketBatches(lengths, 4, seed=1, lead_in=lead), range(13), strict=False
        )
    ]
    assert stream[:3] == lead and stream[3:] == plain  # then the mixture, unchanged
    assert all(d.key < 0 for b in stream[:3] for d in b) and stream[3][0].key >= 0
    for start in (2, 3, 7):
        resumed = LengthBucketBatches(lengths, 4, seed=1, start=start, lead_in=lead)
        again = [b for b, _ in zip(resumed, range(13 - start), strict=False)]
        assert again == stream[start:] and [d.key for d in again[0]] == [
            d.key for d in stream[start]
        ]
    rank1 = LengthBucketBatches(lengths, 4, seed=1, start=0, rank=1, world_size=2, lead_in=lead)
    assert [b for b, _ in zip(rank1, range(3), strict=False)] == stream[1:7:2]


# ----------------------------------------------------------------------------- out of memory


def _out_of_memory(*args):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")


class OutOfMemoryAt(L.Callback):
    """Make the forward (or the backward) pass of one step raise CUDA's out-of-memory error,
    as an unusually long sample would; on CPU, by injection."""

    def __init__(self, step: int, where: str = "forward"):
        self.step, self.where, self.hooks = step, where, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        if self.where == "forward":  # whichever layer runs first
            self.hooks = [m.register_forward_pre_hook(_out_of_memory) for m in pl_module.modules()]
        else:
            self.hooks = [p.register_hook(_out_of_memory) for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_a_batch_out_of_memory_is_skipped_and_counted_then_training_goes_on(tmp_path, where):
    guard = NonFiniteGuard(policy="skip")
    snapshots = _tiny_fit(tmp_path, guard, inject=OutOfMemoryAt(step=2, where=where))
    assert guard.skipped_oom == 1 and guard.skipped == 0
    assert sorted(snapshots) == [1, 2, 3, 4]  # every step taken, the run went on
    # the batch that did not fit changed nothing; the steps around it did
    assert all(torch.equal(a, b) for a, b in zip(snapshots[2], snapshots[3], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[3], snapshots[4], strict=True))


def test_a_batch_out_of_memory_stops_the_run_with_a_clear_message_when_asked(tmp_path):
    with pytest.raises(
        OutOfMemoryStop,
        match=r"Out of memory in the forward pass of step 2.*"
        r"Lower data.batch_size",
    ):
        _tiny_fit(tmp_path, NonFiniteGuard(policy="stop"), inject=OutOfMemoryAt(step=2))


# ----------------------------------------------------------------------------- finished runs


def test_a_finished_run_is_kept_and_one_of_other_settings_is_refused(train_cfg, capsys):
    from herd.utils.run import finished_metrics, mark_finished, write_metrics_json

    cfg = train_cfg("trainer.max_steps=2", "auto_resume=true")
    run = Path(cfg.paths.output_dir)
    assert finished_metrics(run, cfg) is None  # nothing there yet
    write_metrics_json(run, {"val/loss": 1.5})
    assert finished_metrics(run, cfg) is None  # metrics.json alone: cut before the end
    mark_finished(run, cfg)
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert train(cfg) == {"val/loss": 1.5}  # skipped: nothing trained, nothing written
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files
    assert "finished earlier with these settings; kept" in capsys.readouterr().out
    # the progress bar changes no result; the step count does
    assert finished_metrics(
        run, train_cfg("trainer.max_steps=2", "trainer.enable_progress_bar=true")
    )
    with pytest.raises(
        ConfigError, match=r"finished with other settings: trainer.max_steps=2 there vs 3"
    ):
        finished_metrics(run, train_cfg("trainer.max_steps=3"))
