"""No run lost on shared storage (#36): the supervisor's own state, the run dir's lease fencing a woken holder,
durable checkpoints, and a run that never silently restarts from step 0."""

from __future__ import annotations

from vilscale.orchestration.launch.slurm import restarts_used


def test_a_damaged_restart_counter_is_counted_as_zero_not_a_crash(tmp_path, capsys):
    """Before, `int(counter.read_text())` of an empty counter (a supervisor killed mid-write) crashed the supervisor
    and ended the job FAILED. The counter is written atomically now, and one that is damaged anyway is said."""
    counter = tmp_path / "7_failure_restarts"
    assert restarts_used(counter) == 0  # no restart used yet
    counter.write_text("2\n")
    assert restarts_used(counter) == 2
    for damaged in ("", "\x00\x00", "two"):
        counter.write_text(damaged)
        assert restarts_used(counter) == 0
        assert "not a count; counting the restarts used as 0" in capsys.readouterr().err

