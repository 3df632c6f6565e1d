"""`vilscale submit --backend slurm` against a real one-node SLURM cluster (munge, slurmctld, slurmd)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
import real_services as services
from real_services import SMOKE, check_trained_steps, held_before, metric_steps, smoke_overrides, vilscale

pytestmark = pytest.mark.integration


def test_missing_sbatch_is_an_error_before_anything_is_submitted(digits, tmp_path):
    run_dir = tmp_path / "run"
    result = vilscale("submit", str(SMOKE), "--backend", "slurm", *smoke_overrides(digits, run_dir),
                      env={"PATH": str(tmp_path)})
    assert result.returncode == 2, result.stderr
    assert "sbatch not found" in result.stderr
    assert not run_dir.exists()


@pytest.mark.parametrize(("override", "expected"), [
    ("launcher.cpus_per_task=4096", r"asks for 1 node\(s\) with 0 GPU\(s\), 8192 CPU\(s\)"),
    ("launcher.gpus_per_node=8", r"asks for 1 node\(s\) with 8 GPU\(s\)"),
    ("launcher.nodes=3", r"asks for 3 node\(s\)"),
])
def test_a_job_larger_than_the_cluster_is_refused_with_the_numbers(slurm, digits, tmp_path, override, expected):
    result = vilscale("submit", str(SMOKE), "--backend", "slurm", "--set", override,
                      *smoke_overrides(digits, tmp_path / "run"))
    assert result.returncode == 2, result.stderr
    assert re.search(expected, result.stderr), result.stderr
    cpus = os.cpu_count()
    assert f"largest has 0 GPU(s), {cpus} CPU(s)" in result.stderr
    assert slurm.command("squeue", "--noheader").strip() == ""


def _latest_step(run_dir) -> int:
    latest = run_dir / "checkpoints" / "latest"
    return int(latest.read_text().strip().split("_")[-1]) if latest.exists() else -1


@pytest.mark.extended
@pytest.mark.slow
def test_preempted_then_requeued_job_resumes_from_its_latest_checkpoint_each_time(slurm, digits, tmp_path):
    """USR2 (what SLURM sends the batch step before the time limit: `--signal=B:USR2@lead`) reaches the supervisor,
    which passes it to the tasks: they save a checkpoint at the step they are in and rank 0 requeues the job, which
    resumes from exactly that step (no step is trained twice); an administrator's `scontrol requeue` restarts it
    too: its SIGTERM is a notice as well, so the tasks save the step they are in when it reaches them in time, else
    the job resumes from the latest checkpoint (the steps after it are trained again, on the same samples)."""
    run_dir, gate = tmp_path / "run", tmp_path / "release"
    max_steps = 24
    submit = subprocess.Popen(
        [sys.executable, "-m", "vilscale.cli", "submit", str(SMOKE), "--backend", "slurm", "--wait",
         *smoke_overrides(digits, run_dir, held_before(6, gate), max_steps=max_steps, ckpt_every=4,
                          record_samples="true")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=services.REPO,
        env={**os.environ, **slurm.env})
    try:
        job_id = services.wait_until(lambda: slurm.command("squeue", "--noheader", "--format=%i").split(),
                                     timeout_s=60, what="job in the queue")[0]
        logs = tuple((run_dir / "submitit").glob("*_0_log.*"))
        services.wait_until(lambda: _latest_step(run_dir) >= 0, timeout_s=300, what="first checkpoint",
                            poll_s=0.1, logs=logs)
        step_at_signal = _latest_step(run_dir)
        assert step_at_signal == 4, "the ranks are held before step 6: step 4 is the only checkpoint"
        slurm.command("scancel", "--batch", "--signal=USR2", job_id)  # as SLURM sends it: to the batch step
        gate.touch()
        # Rank 0 requeues the job and exits, so this allocation cannot finish the run.
        services.wait_until(lambda: "Restarts=1" in slurm.command("scontrol", "show", "job", job_id),
                            timeout_s=60, what="job requeued by rank 0", logs=logs)
        rank0_err = run_dir / "submitit" / f"{job_id}_0_log.err"
        step_at_requeue = _latest_step(run_dir)  # the checkpoint the ranks saved on the notice
        services.wait_until(lambda: "requeue 1" in rank0_err.read_text() and _latest_step(run_dir) > step_at_requeue,
                            timeout_s=300, what="a new checkpoint in the second allocation", poll_s=0.1, logs=logs)
        step_at_requeue = _latest_step(run_dir)
        slurm.command("scontrol", "requeue", job_id)
        output, _ = submit.communicate(timeout=600)
        # After `scontrol requeue` the tasks keep running until SLURM kills them (KillWait), and may finish
        # the run first; the third allocation then resumes from the final checkpoint. Wait for it either way.
        services.wait_until(lambda: slurm.command("squeue", "--noheader", "--states=all", "--jobs", job_id,
                                                  "--format=%T").strip() == "COMPLETED",
                            timeout_s=300, what="job COMPLETED", logs=logs)
    finally:
        if submit.poll() is None:
            submit.kill()
    assert submit.returncode == 0, output
    assert "Restarts=2" in slurm.command("scontrol", "show", "job", job_id)
    log = rank0_err.read_text()
    assert "Caught signal SIGUSR2" in log and "this job is preempted" in log, log
    saved_on_notice = [int(step) for step in
                       re.findall(r"preemption notice \([^)]*\): stopped at step (\d+), which is saved", log)]
    # the USR2, and the SIGTERM that `scontrol requeue` sends before it kills the tasks (when it reaches them in a
    # step: the run may have finished by then): each saves the step the ranks are in
    assert len(saved_on_notice) in (1, 2) and saved_on_notice[0] >= step_at_signal, log
    resumed = [int(step) for step in re.findall(r"resumed from step_\d+ \(step (\d+)", log)]
    assert len(resumed) == 2, log
    assert resumed[0] == saved_on_notice[0], log
    assert step_at_requeue <= resumed[1] <= max_steps, log
    if len(saved_on_notice) == 2:  # nothing lost to the administrator's requeue either
        assert resumed[1] == saved_on_notice[1] and "the job is being requeued already" in log, log
    assert "CalledProcessError" not in log, log  # rank 0 does not requeue a job SLURM is requeueing already
    # Each rank trained 1..notice, then notice+1..end in the second allocation (wherever SLURM's kill found it:
    # its records tell), then resumed[1]+1..max_steps in the third.
    records = services.sample_records(run_dir)
    assert sorted(records) == [0, 1], sorted(records)
    expected = {}
    for rank, trained in records.items():
        second_end = len(trained) - (max_steps - resumed[1])
        assert second_end >= resumed[1], f"rank {rank} trained {[step for step, _ in trained]}"
        expected[rank] = [*range(1, second_end + 1), *range(resumed[1] + 1, max_steps + 1)]
    check_trained_steps(run_dir, expected)
    assert max(metric_steps(run_dir)) == max_steps
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == max_steps
    assert _latest_step(run_dir) == max_steps


def _job_id(submit_output: str) -> str:
    return re.search(r"submitted slurm job (\d+)", submit_output).group(1)


def _killed_at(step: int, rank: int) -> dict[str, str]:
    """`smoke_overrides` extras that make ``rank`` SIGKILL itself in the middle of ``step`` (what the OOM
    killer does to a rank), once per run dir (VILSCALE_INJECT_FAULT, vilscale/orchestration/faults.py)."""
    return {"launcher.env.VILSCALE_INJECT_FAULT": f"mid-step:{step}:{rank}"}


@contextlib.contextmanager
def _fault_rearmed(run_dir):
    """Delete VILSCALE_INJECT_FAULT's once-per-run-dir marker as soon as it appears, so that the rank dies
    again in every attempt (a rank that runs out of memory at the same step each time)."""
    stop = threading.Event()

    def rearm():
        while not stop.wait(0.1):
            for marker in run_dir.glob(".fault-*"):
                marker.unlink(missing_ok=True)

    thread = threading.Thread(target=rearm, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@pytest.mark.slow
def test_a_rank_killed_by_sigkill_is_relaunched_and_the_run_finishes_from_its_latest_checkpoint(slurm, digits,
                                                                                                 tmp_path):
    """A rank SIGKILLed on its own (the kernel's OOM killer, a driver crash) mid-step: the ranks are launched
    again within the allocation, resume from the latest checkpoint and finish; `--wait` returns 0, and the
    job's log names the restart and its cause."""
    run_dir = tmp_path / "run"
    result = vilscale("submit", str(SMOKE), "--backend", "slurm", "--wait",
                      *smoke_overrides(digits, run_dir, _killed_at(6, rank=1), max_steps=10, ckpt_every=4, log_every=1),
                      env=slurm.env, timeout_s=240)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "restart 1/2 after rank 1 was killed by SIGKILL" in result.stdout, output[-4000:]
    job_id = _job_id(result.stdout)
    log = (run_dir / "submitit" / f"{job_id}_0_log.err").read_text()
    assert "restart 1/2 after rank 1 was killed by SIGKILL" in log
    resumed = [int(step) for step in re.findall(r"resumed from step_\d+ \(step (\d+)", log)]
    assert resumed == [4], log[-3000:]
    steps = metric_steps(run_dir)
    assert steps == [*range(1, 6), *range(5, 11)], f"only step 5 (after the checkpoint at 4) is redone: {steps}"
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 10
    assert f"job {job_id} ended COMPLETED" in result.stdout, output[-2000:]
    record = slurm.command("scontrol", "show", "job", job_id)
    assert "JobState=COMPLETED" in record and "Restarts=0" in record, record


@pytest.mark.extended
@pytest.mark.slow
def test_a_rank_that_keeps_dying_uses_up_max_restarts_and_wait_returns_the_final_state(slurm, digits, tmp_path):
    """Rank 0 is SIGKILLed at step 2 in every attempt: after launcher.max_restarts=1 relaunch the job fails, and
    `--wait` (which cannot use sacct on this cluster, and finds no result from the killed rank) returns 1 as
    soon as the job has ended, printing its final state. The node is not excluded (it is the cluster's only one)."""
    run_dir = tmp_path / "run"
    with _fault_rearmed(run_dir):
        result = vilscale("submit", str(SMOKE), "--backend", "slurm", "--wait",
                          *smoke_overrides(digits, run_dir, {**_killed_at(2, rank=0), "launcher.max_restarts": 1}),
                          env=slurm.env, timeout_s=180)
    returned_at = time.time()
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-4000:]
    job_id = _job_id(result.stdout)
    log = (run_dir / "submitit" / f"{job_id}_0_log.err").read_text()
    assert log.count("was killed by SIGKILL") == 2, log[-3000:]
    assert "restart 1/1 after rank 0 was killed by SIGKILL" in log, log[-3000:]
    assert "giving up after 1 restart" in log, log[-3000:]
    # the one node failed twice in a row, but excluding the cluster's only node would leave the job pending forever
    assert "excluding it would leave the job pending for good" in log, log[-3000:]
    record = slurm.command("scontrol", "show", "job", job_id)
    assert "JobState=FAILED" in record, record
    ended_at = datetime.fromisoformat(re.search(r"EndTime=(\S+)", record).group(1)).timestamp()
    assert returned_at - ended_at < 15, f"--wait returned {returned_at - ended_at:.0f} s after the job ended"
    assert f"job {job_id} ended FAILED" in result.stderr, output[-2000:]
    assert not (run_dir / "summary.json").exists()


@pytest.mark.slow
def test_a_users_mistake_met_by_a_rank_is_not_restarted_and_wait_exits_nonzero_with_the_reason(slurm, digits,
                                                                                                 tmp_path):
    """`train.device=cuda` on a CPU-only node: every rank stops at start with exit code 2 (invalid job spec);
    with restarts allowed (max_restarts=2), the job still ends at once, with that code and the rank's line."""
    run_dir = tmp_path / "run"
    result = vilscale("submit", str(SMOKE), "--backend", "slurm", "--wait",
                      *smoke_overrides(digits, run_dir, device="cuda"), env=slurm.env, timeout_s=180)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-4000:]
    assert "no CUDA device is visible" in result.stderr
    job_id = _job_id(result.stdout)
    log = (run_dir / "submitit" / f"{job_id}_0_log.err").read_text()
    assert "not restarting" in log and "restart 1/" not in log, log[-3000:]
    assert log.count("no CUDA device is visible") >= 1
    record = slurm.command("scontrol", "show", "job", job_id)
    assert "JobState=FAILED" in record and "ExitCode=2:0" in record, record
    assert f"job {job_id} ended FAILED (exit code 2)" in result.stderr, output[-2000:]


@pytest.mark.extended
@pytest.mark.slow
def test_a_run_resumed_with_an_accepted_change_trains_it_and_a_job_queued_before_is_refused(slurm, digits, tmp_path):
    """Job A (4 steps) is submitted while the cluster is held, then the run dir is relaunched as job B with
    --allow-spec-change (6 steps): B's spec is the run dir's from then on. When A reaches its ranks, they refuse
    its older spec (exit 2, not restarted) instead of training it and rewriting spec.yaml; B trains to 6."""
    run_dir = tmp_path / "run"
    first = vilscale("submit", str(SMOKE), "--backend", "slurm", "--wait", *smoke_overrides(digits, run_dir,
                     max_steps=2, ckpt_every=2), env=slurm.env, timeout_s=240)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    slurm.command("scontrol", "update", "PartitionName=debug", "State=DOWN")  # queue A without running it
    try:
        queued = vilscale("submit", str(SMOKE), "--backend", "slurm", "--allow-spec-change",
                          *smoke_overrides(digits, run_dir, max_steps=4, ckpt_every=2), env=slurm.env)
        assert queued.returncode == 0, queued.stderr[-3000:]
        changed = vilscale("submit", str(SMOKE), "--backend", "slurm", "--allow-spec-change",
                           *smoke_overrides(digits, run_dir, max_steps=6, ckpt_every=2), env=slurm.env)
        assert changed.returncode == 0, changed.stderr[-3000:]
    finally:
        slurm.command("scontrol", "update", "PartitionName=debug", "State=UP")
    job_a, job_b = _job_id(queued.stdout), _job_id(changed.stdout)
    services.wait_until(lambda: all("JobState=COMPLETED" in r or "JobState=FAILED" in r
                                    for r in (slurm.command("scontrol", "show", "job", j) for j in (job_a, job_b))),
                        timeout_s=240, what="both jobs ended")
    assert "ExitCode=2:0" in slurm.command("scontrol", "show", "job", job_a)
    log_a = (run_dir / "submitit" / f"{job_a}_0_log.err").read_text()
    assert "differs from" in log_a and "train.max_steps: 4 here, 6 in spec.yaml" in log_a, log_a[-3000:]
    assert "JobState=COMPLETED" in slurm.command("scontrol", "show", "job", job_b)
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 6


def detection_overrides(digits_coco, run_dir) -> list[str]:
    return ["--set", f"run_dir={run_dir}",
            "--set", f"data.train_annotations={digits_coco / 'train' / 'annotations.json'}",
            "--set", f"data.train_images={digits_coco / 'train' / 'images'}",
            "--set", f"data.val_annotations={digits_coco / 'val' / 'annotations.json'}",
            "--set", f"data.val_images={digits_coco / 'val' / 'images'}",
            "--set", "train.max_steps=4", "--set", "train.ckpt_every=4", "--set", "model.score_threshold=0",
            "--set", "model.detections_per_image=5"]


@pytest.mark.slow
def test_a_detection_job_trains_and_evaluates_through_slurm(slurm, digits_coco, tmp_path):
    """The digits RetinaNet on 2 SLURM tasks: its evaluation, split over the ranks and gathered on rank 0, scores
    every validation image once (score threshold 0, so each image has its detections), and the AP it reports is
    what pycocotools computes from the predictions it saved. (The Ray launcher runs the same task-agnostic ranks;
    its detection twin was dropped as proving nothing beyond the classification runs through Ray.)"""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    run_dir = tmp_path / "run"
    result = vilscale("submit", str(services.REPO / "jobs" / "digits_retinanet.yaml"), "--backend", "slurm", "--wait",
                      *detection_overrides(digits_coco, run_dir), env=slurm.env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 4 and summary["val_images"] == 120 and summary["skipped_images"] == 0
    predictions = json.loads((run_dir / "eval" / "bbox.json").read_text())
    per_image: dict[int, int] = {}
    for prediction in predictions:
        per_image[prediction["image_id"]] = per_image.get(prediction["image_id"], 0) + 1
    annotations = digits_coco / "val" / "annotations.json"
    assert sorted(per_image) == sorted(image["id"] for image in json.loads(annotations.read_text())["images"])
    assert max(per_image.values()) <= 5  # one pass per image: a second would double its detections
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(annotations))
        evaluation = COCOeval(truth, truth.loadRes(str(run_dir / "eval" / "bbox.json")), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    assert summary["box_AP"] == pytest.approx(max(0.0, float(evaluation.stats[0])), abs=1e-12)


@pytest.mark.skipif(shutil.which("srun") is None, reason="submitit's SLURM executor needs srun on PATH")
def test_time_limit_requeues_do_not_use_up_the_failure_restarts(tmp_path):
    """submitit stops requeueing a timed-out job after `max_num_timeout` requeues, and a long run needs one
    allocation per `launcher.time_min`: that bound must not be `launcher.max_restarts`, which counts failures
    (with it, a 1440-minute job stopped for good after its fourth allocation)."""
    from vilscale.orchestration.config import load_spec
    from vilscale.orchestration.launch.slurm import make_executor

    spec = load_spec(SMOKE, [f"run_dir={tmp_path / 'run'}", "launcher.max_restarts=3", "launcher.time_min=1440"])
    assert make_executor(spec, "slurm")._executor.max_num_timeout >= 1000


@pytest.mark.skipif(shutil.which("srun") is None, reason="submitit's SLURM executor needs srun on PATH")
def test_site_options_are_written_into_the_batch_script(tmp_path):
    """launcher.slurm's options become #SBATCH lines beside vilscale's own (--requeue stays); an empty value in
    `additional` is a bare flag; left at their defaults, none is written."""
    from vilscale.orchestration.config import load_spec
    from vilscale.orchestration.launch.slurm import make_executor

    def script(*overrides: str) -> set[str]:
        spec = load_spec(SMOKE, [f"run_dir={tmp_path / 'run'}", *overrides])
        return set(make_executor(spec, "slurm")._executor._make_submission_file_text("true", "0").splitlines())

    site = {"#SBATCH --qos=high", "#SBATCH --constraint='a100|h100'", "#SBATCH --exclusive",
            "#SBATCH --reservation=maint", "#SBATCH --exclude='gpu[01-02]'", "#SBATCH --mail-type=END",
            "#SBATCH --overcommit"}
    lines = script("launcher.slurm.qos=high", "launcher.slurm.constraint=a100|h100", "launcher.slurm.exclusive=true",
                   "launcher.slurm.reservation=maint", "launcher.slurm.exclude=gpu[01-02]",
                   "launcher.slurm.additional.mail-type=END", "launcher.slurm.additional.overcommit=")
    assert site | {"#SBATCH --requeue"} <= lines, sorted(lines)
    plain = script()
    assert "#SBATCH --requeue" in plain
    assert not {line.split("=")[0] for line in site} & {line.split("=")[0] for line in plain}, sorted(plain)


def test_site_options_reach_the_job_slurm_holds(slurm, digits, tmp_path):
    """`vilscale submit --backend slurm` with launcher.slurm options: slurmctld's record of the job shows each
    (an exclusive node, the reservation, a comment and a hold through `additional`). The job is held, so it never
    runs; the test cancels it."""
    reservation = "vilscale-site-options"
    slurm.command("scontrol", "create", "reservation", f"ReservationName={reservation}", "Users=root",
                  "Nodes=ALL", "StartTime=now", "Duration=10")
    job_id = None
    try:
        result = vilscale("submit", str(SMOKE), "--backend", "slurm", *smoke_overrides(digits, tmp_path / "run", {
            "launcher.slurm.exclusive": "true", "launcher.slurm.reservation": reservation,
            "launcher.slurm.additional.comment": "site-options-test", "launcher.slurm.additional.hold": ""}),
            env=slurm.env)
        assert result.returncode == 0, result.stderr[-3000:]
        job_id = _job_id(result.stdout)
        record = slurm.command("scontrol", "show", "job", job_id)
    finally:
        if job_id:
            slurm.command("scancel", job_id)
        slurm.command("scontrol", "delete", f"ReservationName={reservation}")
    assert "OverSubscribe=NO" in record, record
    assert f"Reservation={reservation}" in record, record
    assert "Comment=site-options-test" in record, record
    assert "JobState=PENDING" in record and "Priority=0" in record, record  # held


def _fake_slurm_commands(bin_dir, srun_stderr: str, srun_code: int) -> None:
    """An `srun` that prints ``srun_stderr`` and exits with ``srun_code``, and an `scontrol` that no longer knows
    the job: what the supervisor sees of a failed step, without a cluster."""
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"#!/bin/sh\nprintf '%s' {shlex.quote(srun_stderr)} >&2\nexit {srun_code}\n")
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho 'slurm_load_jobs error: Invalid job id specified' >&2\n"
                                      "exit 1\n")
    for command in ("srun", "scontrol"):
        (bin_dir / command).chmod(0o755)


@pytest.mark.parametrize(("srun_stderr", "used_before", "code", "restarts_after", "line"), [
    ("srun: error: n2: task 3: Killed\nsrun: error: n1: task 0: Killed\n", 0, 1, 2,
     "restart 1/2 after rank 3 was killed by SIGKILL"),
    # the count is the job's, kept in the submitit folder: an allocation after a requeue goes on from it
    ("srun: error: n2: task 3: Killed\n", 2, 1, 2, "rank 3 was killed by SIGKILL; giving up after 2 restart(s)"),
    ("srun: error: n1: tasks 0-1: Exited with exit code 1\n", 1, 1, 2,
     "restart 2/2 after ranks 0-1 exited with code 1"),
    ("slurmstepd: error: Detected 1 oom-kill event(s) in StepId=7.0. Some of the step tasks have been OOM Killed.\n"
     "srun: error: n1: task 1: Out Of Memory\n", 0, 5, 0, "SLURM reports the kernel's out-of-memory killer"),
], ids=["killed", "budget-carried-over-a-requeue", "exited-1", "oom-killer"])
def test_the_supervisor_relaunches_restartable_failures_within_the_job_budget(tmp_path, monkeypatch, capsys,
                                                                               srun_stderr, used_before, code,
                                                                               restarts_after, line):
    """The batch step's supervisor with a step that always fails as ``srun_stderr`` says: it relaunches until
    launcher.max_restarts (2) relaunches of the job are used, counting in the submitit folder, and stops at
    once when SLURM reports the OOM killer (exit 5, as the local launcher)."""
    from vilscale.orchestration.launch.slurm import supervise

    _fake_slurm_commands(tmp_path / "bin", srun_stderr, 137)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    folder = tmp_path / "submitit"
    folder.mkdir()
    if used_before:
        (folder / "7_failure_restarts").write_text(f"{used_before}\n")
    assert supervise(["true"], folder=folder, max_restarts=2) == code
    log = capsys.readouterr().err
    assert line in log, log
    assert log.count("[vilscale] restart ") == max(0, restarts_after - used_before), log
    counter = folder / "7_failure_restarts"
    assert (int(counter.read_text()) if counter.exists() else 0) == restarts_after


def _supervisor_child(folder: Path) -> int | None:
    """The pid of the supervisor (the guard's child) of the job whose submitit folder is ``folder``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"vilscale.orchestration.launch.slurm" in command and str(folder).encode() in command \
                and b"VILSCALE_SUPERVISOR_CHILD=1" in environ:
            return int(entry.name)
    return None


@pytest.mark.extended
@pytest.mark.slow
def test_a_supervisor_killed_mid_job_requeues_the_job_instead_of_failing_it(slurm, digits, tmp_path):
    """#36 scenario 8: the supervisor (the batch step that runs and relaunches the tasks) is SIGKILLed while the
    ranks train (the OOM killer's choice on a crowded node, a stray kill -9). Before, the batch script ended with
    it and the job ended FAILED; now its guard requeues the job, the next allocation resumes from the latest
    checkpoint, the job completes, and no failure restart is used."""
    run_dir, gate = tmp_path / "run", tmp_path / "release"
    submit = subprocess.Popen(
        [sys.executable, "-m", "vilscale.cli", "submit", str(SMOKE), "--backend", "slurm", "--wait",
         *smoke_overrides(digits, run_dir, {**held_before(4, gate), "launcher.max_restarts": 0}, ckpt_every=2)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=services.REPO, env={**os.environ, **slurm.env})
    try:
        services.wait_until(lambda: _latest_step(run_dir) >= 2, timeout_s=180, what="the step-2 checkpoint")
        supervisor = services.wait_until(lambda: _supervisor_child(run_dir / "submitit"), timeout_s=30,
                                         what="the supervisor's process")
        os.kill(supervisor, signal.SIGKILL)
        gate.touch()
        out, err = submit.communicate(timeout=300)
    finally:
        gate.touch()
        if submit.poll() is None:
            submit.kill()
    assert submit.returncode == 0, out[-3000:] + err[-3000:]
    job_id = _job_id(out)
    log = "".join(p.read_text() for p in sorted((run_dir / "submitit").glob(f"{job_id}_0_log.err")))
    assert "the supervisor was killed by SIGKILL; requeueing job" in log, log[-3000:]
    assert "Restarts=1" in slurm.command("scontrol", "show", "job", job_id)
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 8
    assert not (run_dir / "submitit" / f"{job_id}_failure_restarts").exists()  # no failure restart was used


@pytest.mark.slow
def test_sigterm_preemption_saves_the_step_and_requeues_the_job(slurm, digits, tmp_path):
    """#37 scenario 3: real preemption. The cluster runs PreemptType=preempt/partition_prio with PreemptMode=REQUEUE
    (tests/integration/real_services.py); a job of the higher-tier partition `urgent` that needs the node makes
    slurmctld send SIGTERM to every process of ours and requeue the job (SIGKILL after the partition's GraceTime).
    Before, the supervisor had no handler and died at once, the tasks ignored SIGTERM (submitit's handler) until
    the SIGKILL, and the work since the last checkpoint was lost. Now SIGTERM is a notice like USR2: the ranks save
    at the step they are in, and the job resumes from exactly that step once the urgent job is done; the restart
    budget (launcher.max_restarts=0) is not used."""
    run_dir, gate = tmp_path / "run", tmp_path / "release"
    submit = subprocess.Popen(
        [sys.executable, "-m", "vilscale.cli", "submit", str(SMOKE), "--backend", "slurm", "--wait",
         *smoke_overrides(digits, run_dir, {**held_before(6, gate), "launcher.max_restarts": 0}, max_steps=12,
                          ckpt_every=4)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=services.REPO,
        env={**os.environ, **slurm.env})
    try:
        services.wait_until(lambda: _latest_step(run_dir) >= 4, timeout_s=300, what="the step-4 checkpoint")
        job_id = slurm.command("squeue", "--noheader", "--format=%i").split()[0]
        urgent = slurm.command("sbatch", "--parsable", "--partition=urgent", "--exclusive", "--output=/dev/null",
                               "--wrap=sleep 2").strip()
        gate.touch()  # the ranks go on past their hold, into the notice (held, they could not save before SIGKILL)
        services.wait_until(lambda: "JobState=COMPLETED" in slurm.command("scontrol", "show", "job", urgent),
                            timeout_s=180, what="the urgent job ran", poll_s=0.5)
        output, _ = submit.communicate(timeout=600)
    finally:
        gate.touch()
        if submit.poll() is None:
            submit.kill()
    assert submit.returncode == 0, output[-4000:]
    log = "".join(p.read_text() for p in sorted((run_dir / "submitit").glob(f"{job_id}_0_log.err")))
    saved = [int(step) for step in re.findall(r"preemption notice \([^)]*\): stopped at step (\d+), which is saved",
                                              log)]
    resumed = [int(step) for step in re.findall(r"resumed from step_\d+ \(step (\d+)", log)]
    assert saved and resumed == saved[:1] and saved[0] >= 5, log[-4000:]  # saved where it was, not at step 4
    assert "SIGTERM: saving a checkpoint at the end of this step" in log, log[-4000:]
    assert "Restarts=1" in slurm.command("scontrol", "show", "job", job_id)
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 12


def test_the_notice_lead_time_is_a_launcher_key_sent_to_the_batch_step(tmp_path):
    """#37 scenario 3: the 120 s before the time limit were fixed; an evaluation and a large save may need more."""
    from vilscale.orchestration.config import load_spec
    from vilscale.orchestration.launch.slurm import make_executor

    spec = load_spec(SMOKE, [f"run_dir={tmp_path / 'run'}", "launcher.slurm.signal_lead_s=600"])
    executor = make_executor(spec, "slurm")._executor
    script = executor._make_submission_file_text(executor._submitit_command_str, "0")
    assert "#SBATCH --signal=B:USR2@600" in script and "#SBATCH --requeue" in script, script
    assert "\nexec " in script  # the guard is the batch shell: the notice reaches it
