"""Every `vilscale` command in the bash blocks of the README and of the docs pages (docs/*.md) is one a user
can type: its arguments parse, and the job it trains, submits or plans passes the spec and world-size checks with
its `--set` overrides, on the ranks the command would start; `export`/`eval --ema` name a run that keeps an EMA.
(The blocks that run here at smoke scale are run by their own tests: the quickstart by test_journey and the demo,
the smoke commands by test_trainer, digits detection by test_detection. Cluster-sized ones need ImageNet and GPUs:
they are checked, not run.) The README links every docs page, and every link between them leads to a file."""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
from pathlib import Path

import pytest

from vilscale.cli import SUBCOMMANDS
from vilscale.orchestration.config import load_spec

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [README, *DOCS]


def readme_commands(pages: list[Path] | None = None) -> list[tuple[tuple[str, int], list[str], Path]]:
    """((file, block number in that file), the vilscale arguments, the folder job paths are relative to) of every
    command in the bash blocks of the README and the docs pages, continuation lines joined and comments dropped.
    Commands are typed from the repository root, whichever page shows them."""
    commands = []
    for page in PAGES if pages is None else pages:
        name = str(page.relative_to(REPO))
        blocks = re.findall(r"```bash\n(.*?)```", page.read_text(), re.S)
        for number, block in enumerate(blocks):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                if words[:1] == ["vilscale"]:
                    commands.append(((name, number), words[1:], REPO))
                elif "vilscale.cli" in words:  # `ray job submit --working-dir jobs -- PYTHON -m vilscale.cli ...`
                    working_dir = words[words.index("--working-dir") + 1] if "--working-dir" in words else "."
                    commands.append(((name, number), words[words.index("vilscale.cli") + 1:], REPO / working_dir))
    return commands


COMMANDS = readme_commands()


def job_path(base: Path, job: str) -> Path | str:
    """What a command's job argument names: a file relative to where the command is typed, or a shipped job's name
    (`vilscale train smoke`), which load_spec resolves itself."""
    return base / job if (base / job).exists() or "/" in job or job.endswith(".yaml") else job


def parse(words: list[str]) -> argparse.Namespace:
    name, rest = words[0], words[1:]
    assert name in SUBCOMMANDS, f"`vilscale {name}` is not a command"
    parser = argparse.ArgumentParser(prog=f"vilscale {name}", exit_on_error=False)
    importlib.import_module(SUBCOMMANDS[name][0]).add_parser(parser)
    try:
        return parser.parse_args(rest)
    except (argparse.ArgumentError, SystemExit) as error:
        raise AssertionError(f"`vilscale {' '.join(words)}` does not parse: {error}") from None


def test_the_readme_has_the_commands_this_test_reads():
    """Over the README and every docs page: each subcommand the pages showed before they were split, and at least
    the 42 commands the README's bash blocks held then (a move that loses a block fails here)."""
    names = {words[0] for _, words, _ in COMMANDS}
    assert {"prepare", "train", "plan", "submit", "eval", "export", "report", "predict", "demo"} <= names, names
    assert {page for (page, _), _, _ in COMMANDS} >= {"README.md", "docs/data.md", "docs/training.md"}
    assert len(COMMANDS) >= 42, len(COMMANDS)


def doc_links(page: Path) -> list[str]:
    """Relative targets of a page's markdown links and image sources (no URLs, no in-page anchors), anchors cut."""
    targets = re.findall(r"\]\(([^)\s]+)\)", page.read_text()) + re.findall(r'src="([^"]+)"', page.read_text())
    return [target.split("#")[0] for target in targets if not re.match(r"[a-z]+:|#", target)]


def test_the_readme_links_every_docs_page_and_every_link_leads_to_a_file():
    readme_links = {(REPO / target).resolve() for target in doc_links(README)}
    assert DOCS, "no docs pages"
    assert [page.name for page in DOCS if page.resolve() not in readme_links] == []
    assert [target for target in doc_links(README) if target.startswith("docs/") and not (REPO / target).exists()] \
        == []


@pytest.mark.parametrize("page", DOCS, ids=[page.name for page in DOCS])
def test_a_docs_page_links_back_and_its_links_lead_to_files(page):
    lines = page.read_text().splitlines()
    assert lines[0].startswith("# ") and "[back to the README](../README.md)" in lines[:4], lines[:4]
    assert [target for target in doc_links(page) if not (page.parent / target).exists()] == []
    assert "../shared" not in page.read_text()


@pytest.mark.parametrize("block, words, base", COMMANDS,
                         ids=[f"{page}:{number} {' '.join(w)[:90]}" for (page, number), w, _ in COMMANDS])
def test_a_readme_command_parses_and_its_job_passes_the_checks(block, words, base):
    args = parse(words)
    if words[0] not in ("train", "submit", "plan"):
        return
    spec = load_spec(job_path(base, args.job), args.overrides)  # SpecError names the key
    if words[0] == "train" and args.launcher == "local" and args.nproc is None:  # plan only counts the ranks
        assert spec.launcher.nodes == 1, f"`vilscale {' '.join(words)}` would start {spec.launcher.world_size} " \
                                         f"ranks of {spec.launcher.nodes} nodes on one machine"
    spec.check_world(getattr(args, "nproc", None) or spec.launcher.world_size)


def ema_without_an_ema(commands) -> list[str]:
    """`export`/`eval --ema` commands that read a run trained or submitted earlier in their block without an EMA."""
    wrong = []
    for block in sorted({number for number, _, _ in commands}):
        ema_of_run = {}
        for _, words, base in (c for c in commands if c[0] == block):
            args = parse(words)
            if words[0] in ("train", "submit"):
                spec = load_spec(job_path(base, args.job), args.overrides)
                ema_of_run[str(Path(spec.run_dir))] = spec.optim.ema_decay > 0
            elif words[0] in ("export", "eval") and args.ema and ema_of_run.get(str(Path(args.run_dir))) is False:
                wrong.append(" ".join(words))
    return wrong


def test_export_and_eval_with_ema_name_a_run_that_keeps_one():
    assert ema_without_an_ema(COMMANDS) == []
    # the README's 21K chain as it was: the pretraining job keeps no EMA
    old_chain = [(0, ["submit", "jobs/pretrain_21k.yaml", "--set", "run_dir=/shared/runs/pretrain_21k"], REPO),
                 (0, ["export", "/shared/runs/pretrain_21k", "/shared/w.safetensors", "--ema"], REPO)]
    assert ema_without_an_ema(old_chain) == ["export /shared/runs/pretrain_21k /shared/w.safetensors --ema"]


def test_the_local_launch_of_a_multi_node_job_is_refused_in_one_line(smoke, tmp_path, capsys):
    """What the README's old `vilscale train jobs/train_1k.yaml --set ...` did: 64 local ranks of 8 nodes."""
    from vilscale.cli import main

    code = main(["train", str(REPO / "jobs" / "smoke.yaml"), *smoke.args(tmp_path / "run"),
                 "--set", "launcher.nodes=4"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "launcher.nodes=4 asks for 8 ranks of 4 nodes" in err and "give --nproc N" in err, err
    assert not (tmp_path / "run").exists()
