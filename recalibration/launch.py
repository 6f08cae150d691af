"""``accelerate launch --cpu --num_processes N`` starts one process, not N.

accelerate's multi-CPU launcher is mpirun (an MPI install); without it ``accelerate launch --cpu``
takes its single-process path whatever --num_processes or the config file say, and a run would
train alone and exit 0. recalibration.run therefore notices that it is that one process (accelerate
set ACCELERATE_USE_CPU, no launcher set RANK, and the parent process is ``accelerate launch``),
reads the launch command and its config with accelerate's own parser, and starts the N ranks itself
with torch's elastic launcher (torchrun), as accelerate does on GPUs. An FSDP config
(``distributed_type: FSDP``) becomes ``--fsdp``.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

from .config import RecalibConfigError

log = logging.getLogger("drope.recalib")


@dataclass(frozen=True)
class CpuLaunch:
    ranks: int
    fsdp: bool
    port: int | None
    """--main_process_port, if given (otherwise torchrun picks a free one)."""


def accelerate_cpu_launch() -> CpuLaunch | None:
    """What ``accelerate launch --cpu`` was asked for, when this process is the one it started for several."""
    from accelerate.utils import str_to_bool

    if any(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return None
    if not str_to_bool(os.environ.get("ACCELERATE_USE_CPU", "false")):
        return None
    import psutil

    try:
        cmd = psutil.Process(os.getppid()).cmdline()
    except psutil.Error:
        return None
    at = next(
        (i for i, a in enumerate(cmd) if a == "launch" or a.endswith(("accelerate-launch", ".commands.launch"))), None
    )
    if at is None:
        return None
    from accelerate.commands.config.config_args import default_config_file, load_config_from_file
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import DistributedType

    args = launch_command_parser().parse_args(cmd[at + 1 :])
    config = (
        load_config_from_file(args.config_file) if args.config_file or os.path.isfile(default_config_file) else None
    )
    ranks = args.num_processes or (config.num_processes if config else 1)
    if (args.num_machines or (config.num_machines if config else 1)) > 1:
        raise RecalibConfigError(
            "accelerate launch --cpu over several machines: run torchrun on each machine instead "
            "(README, recalibration)"
        )
    if ranks <= 1:
        return None
    fsdp = bool(args.use_fsdp) or (config is not None and config.distributed_type == DistributedType.FSDP)
    return CpuLaunch(ranks=ranks, fsdp=fsdp, port=args.main_process_port)


def relaunch(request: CpuLaunch) -> None:
    """Replace this process by torchrun starting ``request.ranks`` copies of it (the same module or script
    with the same arguments, as accelerate started it); its exit status becomes the launch's."""
    main = sys.modules["__main__"]
    target = ["-m", main.__spec__.name] if getattr(main, "__spec__", None) else [sys.argv[0]]
    rendezvous = ["--master_port", str(request.port)] if request.port else ["--standalone"]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *rendezvous,
        "--nproc_per_node",
        str(request.ranks),
        *target,
        *sys.argv[1:],
        *(["--fsdp"] if request.fsdp else []),
    ]
    log.info(
        "accelerate launch --cpu starts a single process; starting the %d ranks with torchrun%s",
        request.ranks,
        ", FSDP" if request.fsdp else "",
    )
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, cmd)
