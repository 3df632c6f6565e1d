"""Shared test configuration: GPU tests are skipped on machines without CUDA; the CPU subset
always runs. Thread counts are capped so two-core CI machines stay responsive."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small CPU models run faster on one thread, and much faster when other processes share the cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The quick tier (`make test`, VILSCALE_TEST_TIER=quick) runs the tests marked neither slow, integration, multinode
# nor faults, plus the slow ones given a `budget` (QUICK_TIER_MARKERS, what the Makefile passes to -m), and fails any
# test whose call takes longer than its budget: 10 s unless `@pytest.mark.budget(S)` says more, and 150 s for a
# test's setup (the session's shared runs). So a slow test cannot slip into the tier a newcomer runs unnoticed: mark
# it slow (the full tier, make test-full), or give it a budget and say why it belongs in make test.
QUICK_TIER = os.environ.get("VILSCALE_TEST_TIER") == "quick"
QUICK_CALL_BUDGET_S = 10.0
QUICK_SETUP_BUDGET_S = 150.0


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not QUICK_TIER or call.when not in ("setup", "call") or report.outcome != "passed":
        return
    marker = item.get_closest_marker("budget")
    limit = QUICK_SETUP_BUDGET_S if call.when == "setup" else (marker.args[0] if marker else QUICK_CALL_BUDGET_S)
    if report.duration > limit:
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid}: its {call.when} took {report.duration:.1f} s in the quick tier, over its "
                           f"budget of {limit:.0f} s; mark it slow (make test-full only) or give it "
                           "@pytest.mark.budget(SECONDS) with the reason it belongs in make test")


_STARTED = {}


def pytest_sessionstart(session):
    import time

    _STARTED["at"] = time.monotonic()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    import time

    if QUICK_TIER:
        took = time.monotonic() - _STARTED.get("at", time.monotonic())
        terminalreporter.write_line(f"quick tier (make test): {took:.0f} s; the full suite is make test-full")


# Markers whose tests run only when the -m expression names them, with why they are skipped otherwise.
OPT_IN = {"transfer": "twelve fine-tunes of about a minute: run make test-transfer",
          "extended": "minutes on 2 cores (a long real-cluster scenario or a lab-sized job): run make test-extended"}


def pytest_collection_modifyitems(config, items):
    if any("gpu" in item.keywords for item in items) and not _cuda_available():
        skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none on this machine")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)
    chosen = config.getoption("markexpr") or ""
    for marker, reason in OPT_IN.items():  # chosen only by name: `make test-transfer`, `make test-extended`
        if marker not in chosen:
            skip = pytest.mark.skip(reason=reason)
            for item in items:
                if marker in item.keywords:
                    item.add_marker(skip)


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def private_checksum_cache(tmp_path_factory):
    """A checksum cache of the module's own (VILSCALE_CACHE_DIR), so no test trusts another's verification."""
    previous = os.environ.get("VILSCALE_CACHE_DIR")
    os.environ["VILSCALE_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if previous is None:
        os.environ.pop("VILSCALE_CACHE_DIR")
    else:
        os.environ["VILSCALE_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> Path:
    """Real digits shards (scikit-learn's handwritten digits), written once per test session."""
    out = tmp_path_factory.mktemp("digits")
    result = subprocess.run([sys.executable, "-m", "vilscale.cli", "prepare", "digits", str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def digits_coco(tmp_path_factory) -> Path:
    """COCO-format digits canvases (`vilscale prepare digits-coco`, the default 600 train / 120 val), written once."""
    from vilscale.data.coco import write_digits_coco

    out = tmp_path_factory.mktemp("digits_coco")
    write_digits_coco(out)
    return out


# The quickstart's classification job, shortened: its export is what the journey fine-tunes and what the transfer
# test starts a segmenter from (the README's measurements of both used these 4 epochs).
PRETRAIN_EPOCHS = 4


@pytest.fixture(scope="session")
def pretrained_digits(digits, tmp_path_factory) -> Path:
    """vil_nano pretrained on the digits at 32 px for PRETRAIN_EPOCHS epochs on 2 ranks (jobs/demo_digits.yaml)."""
    run_dir = tmp_path_factory.mktemp("pretrain") / "run"
    result = subprocess.run(
        [sys.executable, "-m", "vilscale.cli", "train", str(REPO / "jobs" / "demo_digits.yaml"), "--nproc", "2",
         "--set", f"run_dir={run_dir}", "--set", f"data.train_manifest={digits / 'train' / 'manifest.json'}",
         "--set", f"data.val_manifest={digits / 'val' / 'manifest.json'}",
         "--set", f"train.epochs={PRETRAIN_EPOCHS}", "--set", "eval.every_epochs=100"],
        capture_output=True, text=True, cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return run_dir


class SmokeRuns:
    """Runs jobs/smoke.yaml through the real `vilscale` command on the session's digits shards."""

    BASELINE = ("--set", "train.record_samples=true", "--set", "optim.ema_decay=0.9",
                "--set", "model.shift_mode=random", "--set", "schedule.full_attention_from=0.5")
    """What the uninterrupted reference run (`baseline_run`) sets on top of the smoke job: per-step sample records,
    an EMA, and the official attention schedule (random shifts, full attention from step 4 of 8)."""

    def __init__(self, digits: Path):
        self.digits = digits

    def using(self, digits: Path) -> SmokeRuns:
        """The same runner over other shards (e.g. a damaged copy)."""
        return SmokeRuns(digits)

    def args(self, run_dir: Path, *extra: str) -> list[str]:
        return ["--set", f"run_dir={run_dir}",
                "--set", f"data.train_manifest={self.digits / 'train' / 'manifest.json'}",
                "--set", f"data.val_manifest={self.digits / 'val' / 'manifest.json'}", *extra]

    def train(self, run_dir: Path, *extra: str, nproc: int = 2, check: bool = True, env: dict | None = None):
        command = [sys.executable, "-m", "vilscale.cli", "train", str(REPO / "jobs" / "smoke.yaml"),
                   "--nproc", str(nproc), *self.args(run_dir, *extra)]
        result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=900,
                                env={**os.environ, **(env or {})})
        if check:
            assert result.returncode == 0, result.stderr[-4000:]
        return result

    @staticmethod
    def export(run_dir: Path, out: Path, *extra: str) -> dict:
        from safetensors.torch import load_file

        result = subprocess.run([sys.executable, "-m", "vilscale.cli", "export", str(run_dir), str(out), *extra],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return load_file(str(out))

    @staticmethod
    def samples(run_dir: Path) -> dict:
        """{rank: {step: indices}} as recorded (a re-done step's last record wins)."""
        out = {}
        for path in sorted((run_dir / "samples").glob("rank*.jsonl")):
            per_step = {}
            for line in path.read_text().splitlines():
                record = json.loads(line)
                per_step[record["step"]] = record["indices"]
            out[int(path.stem.removeprefix("rank"))] = per_step
        return out


@pytest.fixture(scope="session")
def smoke(digits) -> SmokeRuns:
    return SmokeRuns(digits)


@pytest.fixture(scope="session")
def baseline_run(smoke, tmp_path_factory) -> Path:
    """One uninterrupted 2-rank ZeRO-2 run of the smoke job (8 steps, checkpoints at 4 and 8) with an EMA and
    random-shift attention switching to full at step 4, recording every step's sample indices: the reference
    the resume and fault tests compare against."""
    run_dir = tmp_path_factory.mktemp("baseline") / "run"
    smoke.train(run_dir, *smoke.BASELINE)
    return run_dir


@pytest.fixture
def refused(monkeypatch, capsys):
    """``refused(*args) -> line``: `vilscale ARGS` through its entry point in this process (no interpreter start-up
    per case), where starting a rank or submitting a job fails the test at once, so a refusal is proven to come
    before any rank; asserts exit code 2, one line on stderr and no traceback, and returns that line."""
    from vilscale.cli import main

    def started(*args, **kwargs):
        raise AssertionError("a rank was started (or a job submitted) for a launch that should have been refused")

    monkeypatch.setattr("vilscale.orchestration.launch.local.train_local", started)
    monkeypatch.setattr("vilscale.orchestration.launch.slurm.submit_submitit", started)
    monkeypatch.setattr("vilscale.orchestration.launch.ray.submit_ray", started)

    def run(*args: str) -> str:
        capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as exit_:  # argparse's own refusals
            code = exit_.code
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2, (code, err[-3000:])
        assert len(lines) == 1 and "Traceback" not in err and "restarting" not in err, err[-3000:]
        return lines[0]

    return run


@pytest.fixture(scope="session")
def killed_mid_step_run(smoke, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The baseline's job with rank 1 SIGKILLed in the middle of step 6 (restarted from the step-4 checkpoint by
    the local launcher), logging every step to metrics.jsonl and TensorBoard: (its run dir, the launch's output).
    Shared by the fault test (samples and weights equal the uninterrupted run's) and the TensorBoard test (one run
    with steps 1-8 after the restart); the logging keys change nothing that is trained."""
    run_dir = tmp_path_factory.mktemp("killed") / "run"
    result = smoke.train(run_dir, *smoke.BASELINE, "--set", "metrics.tensorboard=true", "--set", "train.log_every=1",
                         env={"VILSCALE_INJECT_FAULT": "mid-step:6:1"})
    return run_dir, result


@pytest.fixture(scope="session")
def baseline_eval(baseline_run) -> subprocess.CompletedProcess:
    """`vilscale eval` of the baseline run, once per session (what the trainer reported is compared with it, and
    evaluations of its exported weights on the job spec)."""
    result = subprocess.run([sys.executable, "-m", "vilscale.cli", "eval", str(baseline_run)], capture_output=True,
                            text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result
