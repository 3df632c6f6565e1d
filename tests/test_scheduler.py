"""What schedulers and GPUs really do (#37), on the CPU: NCCL's error handling and how its failures are classified,
how `submit --wait` learns the end of a job SLURM has forgotten."""

from __future__ import annotations

import json

import pytest


def test_nccl_error_handling_is_on_and_a_site_setting_of_0_is_refused(tmp_path):
    """#37 scenario 6 on the CPU: before, nothing set TORCH_NCCL_ASYNC_ERROR_HANDLING, and a site's 0 (through
    launcher.env or the environment) made a lost peer hang every rank forever."""
    from vilscale.errors import SpecError
    from vilscale.orchestration.config import spec_from_dict
    from vilscale.orchestration.training.distributed import nccl_environment

    env: dict[str, str] = {}
    added = nccl_environment(str(tmp_path / "run"), env)
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" and env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert env["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] == str(tmp_path / "run" / "nccl_traces" / "rank_") and added == env
    site = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3"}  # a site's own non-zero choice is kept
    nccl_environment(str(tmp_path), site)
    assert site["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"
    with pytest.raises(SpecError, match="TORCH_NCCL_ASYNC_ERROR_HANDLING=0 .* hang every other rank forever"):
        nccl_environment(str(tmp_path), {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "0"})
    with pytest.raises(SpecError, match="launcher.env.TORCH_NCCL_ASYNC_ERROR_HANDLING='0'"):
        spec_from_dict({"run_dir": "r", "data": {}, "launcher": {"env": {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "0"}}})


def test_nccl_failures_are_classified_a_lost_peer_restarts_an_out_of_memory_does_not():
    import torch.distributed as dist

    from vilscale.errors import EXIT_FAILED, EXIT_OUT_OF_MEMORY
    from vilscale.orchestration.launch.exit_codes import classify

    watchdog = dist.DistBackendError("[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=9, "
                                     "OpType=ALLREDUCE, Timeout(ms)=600000) ran for 600012 milliseconds")
    code, line = classify(watchdog)
    assert code == EXIT_FAILED and line.startswith("stopped because another rank failed"), line
    memory = dist.DistBackendError("NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled cuda error, NCCL version "
                                   "2.21.5\nncclUnhandledCudaError: Call to CUDA function failed.\nLast error:\n"
                                   "CUDA error: out of memory")
    code, line = classify(memory)
    assert code == EXIT_OUT_OF_MEMORY and "inside a collective (NCCL)" in line, line


def test_wait_learns_how_a_forgotten_job_ended_from_the_run_dirs_record(tmp_path):
    """#37 scenario 4: after MinJobAge slurmctld answers "Invalid job id" (asked here of a job it never had), and
    without accounting `sacct` fails (as on this cluster); before, `--wait` then printed the last state it had seen
    ("ended RUNNING") and returned 1 although every task succeeded. The supervisor now records how each allocation
    ended in the run dir, and `--wait` reads that."""
    import subprocess

    from vilscale.orchestration.launch.slurm import _write_outcome, ended_record

    job = "987654321"
    probe = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True)
    assert probe.returncode != 0  # slurmctld does not know it (or no controller answers here)
    folder = tmp_path / "submitit"
    folder.mkdir()
    assert ended_record(job, folder) is None  # nothing recorded: unknown, not "RUNNING"
    _write_outcome(folder, job, requeues=2, state="REQUEUED", code=0)
    assert ended_record(job, folder) is None  # a requeued allocation does not tell how the job ended
    _write_outcome(folder, job, requeues=3, state="COMPLETED", code=0)
    record = ended_record(job, folder)
    assert (record.state, record.exit_code, record.restarts) == ("COMPLETED", "0:0", 3)
    assert record.ending() == "COMPLETED"
    _write_outcome(folder, job, requeues=3, state="FAILED", code=2)
    assert ended_record(job, folder).ending() == "FAILED (exit code 2)"
    assert json.loads((folder / f"{job}_outcome.json").read_text())["exit_code"] == 2
