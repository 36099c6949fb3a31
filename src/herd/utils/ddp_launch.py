"""Lightning's `ddp` launcher, made to work inside Hydra runs and multiruns: the other
ranks of a job are started with this job's overrides and write into this job's directory,
and a finished job leaves nothing behind that would confuse the next job of a sweep."""

from __future__ import annotations

import os
import sys

# Flags of Hydra's command line that take the next argument as their value.
_HYDRA_VALUE_FLAGS = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd")


def ddp_child_command(local_rank: int) -> tuple[list[str], str]:
    """The command (and cwd) with which Lightning's `ddp` launcher starts rank `local_rank`:
    this program again, with this job's own overrides, writing into this job's run directory.

    Lightning's own version re-runs `sys.argv` with the *run* directory, which is wrong for a
    multirun: the children would see `-m` and the comma lists, start a sweep of their own and
    write to a new sweep directory. The job's overrides name exactly one setting."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd, to_absolute_path

    import __main__  # the running program, looked up when the ranks start (as Lightning does)

    hydra_cfg = HydraConfig.get()
    if __main__.__spec__ is None:  # a console script (herd-train) or a file path
        command = [sys.executable, to_absolute_path(sys.argv[0])]
    else:  # python -m herd.train
        command = [sys.executable, "-m", __main__.__spec__.name]
    args = iter(sys.argv[1:])
    for arg in args:  # keep --config-name and friends; drop -m and the overrides
        if arg in _HYDRA_VALUE_FLAGS:
            command += [arg, next(args, "")]
        elif arg.startswith("-") and arg not in ("-m", "--multirun"):
            command.append(arg)
    command += list(hydra_cfg.overrides.task)
    command += [
        f'hydra.run.dir="{hydra_cfg.runtime.output_dir}"',
        f"hydra.job.name=train_ddp_process_{local_rank}",
        "hydra.output_subdir=null",  # rank 0 alone writes .hydra/
        "hydra.mode=RUN",  # hparams_search configs set MULTIRUN; a rank is one job
    ]
    return command, get_original_cwd()


def use_job_dir_for_ddp_children() -> None:
    """Make Lightning's `ddp` launcher start the other ranks with `ddp_child_command`."""
    from lightning.fabric.strategies.launchers import subprocess_script as fabric_launcher
    from lightning.pytorch.strategies.launchers import subprocess_script as pytorch_launcher

    # the pytorch launcher imported the function by name: both modules need the new one
    fabric_launcher._hydra_subprocess_cmd = ddp_child_command
    pytorch_launcher._hydra_subprocess_cmd = ddp_child_command


# What Lightning's ddp launcher puts into this process's environment for its children.
DDP_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def end_ddp_job(env_before: set[str]) -> None:
    """Undo what a ddp job left in this process, so that the next job of a multirun starts
    its own children: Lightning reads a set LOCAL_RANK as "launched from outside"."""
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for name in DDP_LAUNCH_ENV:
        if name not in env_before:
            os.environ.pop(name, None)
