"""herd-recipe's glue: stage overrides, checkpoint hand-over, finished stages kept."""

from __future__ import annotations

import json

import pytest

from herd import recipe
from herd.errors import ConfigError


def test_overrides_are_routed_to_their_stage():
    routed = recipe.parse_overrides(["fusion:finetune=lora", "speech:trainer.max_steps=5"])
    assert routed["fusion"] == ["finetune=lora"] and routed["speech"] == ["trainer.max_steps=5"]
    assert routed["language"] == routed["vision"] == []
    for bad in ("finetune=lora", "audio:x=1", "fusion:lora"):
        with pytest.raises(ConfigError, match="must read STAGE:KEY=VALUE"):
            recipe.parse_overrides([bad])


def test_best_checkpoint_prefers_the_monitored_one(tmp_path):
    ckpts = tmp_path / "vision" / "checkpoints"
    ckpts.mkdir(parents=True)
    with pytest.raises(ConfigError, match="holds no checkpoint"):
        recipe.best_checkpoint(tmp_path / "vision")
    (ckpts / "last.ckpt").write_bytes(b"x")
    assert recipe.best_checkpoint(tmp_path / "vision").name == "last.ckpt"
    (ckpts / "step000400.ckpt").write_bytes(b"x")
    assert recipe.best_checkpoint(tmp_path / "vision").name == "step000400.ckpt"


def test_finished_stages_are_kept_and_the_summary_gathers_them(tmp_path, monkeypatch):
    for stage in recipe.STAGES:
        (tmp_path / stage / "checkpoints").mkdir(parents=True)
        (tmp_path / stage / "checkpoints" / "last.ckpt").write_bytes(b"x")
        (tmp_path / stage / "metrics.json").write_text(json.dumps({"test/x": 1.0}))
    monkeypatch.setattr(recipe.subprocess, "run", lambda *a, **k: pytest.fail("reran a stage"))
    recipe.main(["--run-dir", str(tmp_path)])
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary == {f"{stage}.test/x": 1.0 for stage in recipe.STAGES}


def test_a_failed_stage_stops_the_recipe_naming_it(tmp_path, monkeypatch, capsys):
    class Failed:
        returncode = 3

    monkeypatch.setattr(recipe.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(SystemExit) as exit_info:
        recipe.main(["--run-dir", str(tmp_path), "--stages", "vision"])
    assert exit_info.value.code == 1
    assert "Stage vision failed (exit 3)" in capsys.readouterr().err


def test_seed_reaches_every_stage_and_a_stage_override_wins(tmp_path, monkeypatch):
    commands = {}

    class Done:
        returncode = 0

    def fake_run(command, *args, **kwargs):
        stage_dir = next(c for c in command if c.startswith("hydra.run.dir=")).split("=", 1)[1]
        commands[stage_dir.rsplit("/", 1)[-1]] = command
        return Done()

    monkeypatch.setattr(recipe.subprocess, "run", fake_run)
    monkeypatch.setattr(recipe, "best_checkpoint", lambda stage_dir: stage_dir / "last.ckpt")
    recipe.main(["--run-dir", str(tmp_path), "--seed", "7", "vision:seed=3"])
    assert set(commands) == set(recipe.STAGES)
    for stage, command in commands.items():
        seeds = [c for c in command if c.startswith("seed=")]
        assert seeds[-1] == ("seed=3" if stage == "vision" else "seed=7"), (stage, seeds)


def test_every_stage_composes_and_the_fusion_stage_keeps_both_encoders(tmp_path):
    from .conftest import compose_cfg

    for stage, args in recipe.STAGES.items():
        cfg = compose_cfg("train", args, tmp_path / stage)
        assert cfg.model._target_.endswith(f"{stage.capitalize()}System"), stage
    assert list(cfg.finetune.frozen) == ["image_encoder", "speech_encoder"]  # fusion, the last
    # a stage override still wins
    cfg = compose_cfg("train", [*recipe.STAGES["fusion"], "finetune.frozen=[]"], tmp_path / "f")
    assert list(cfg.finetune.frozen) == []
