"""The documentation: every relative link and `#anchor` in README.md and docs/*.md resolves (the anchor
under GitHub's heading slugs), the README stays a five-minute read whose first screen gives the commands
to run next and whose `llm` commands parse, and docs/experiments.md's readable `dvc exp show` runs and
fits in 120 columns on a scratch DVC repository shaped like this one."""

import json
import re
import shlex
from pathlib import Path
from urllib.parse import unquote

import yaml

from tests.conftest import ROOT, committed, dpo_metrics, scratch_repo

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"", re.I)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def prose(text: str) -> str:
    """The page without its fenced code blocks (a `#` or `[x](y)` in code is neither heading nor link)."""
    kept, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            kept.append(line)
    return "\n".join(kept)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text (a link's text, no markup), lowercased, every
    character but letters, digits, spaces, '-' and '_' dropped, spaces turned into '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link shows its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML shows nothing of its tags
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every anchor of a page: its headings' slugs, a repeated one suffixed -1, -2, ..., and <a id/name>."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    body = prose(text)
    for line in body.splitlines():
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(1))
        name = base
        while name in found:
            seen[base] = seen.get(base, 0) + 1
            name = f"{base}-{seen[base]}"
        found.add(name)
    return found | set(HTML_ANCHOR.findall(body))


def links(text: str) -> list[str]:
    """The targets of a page's inline links, images and reference definitions, outside code."""
    body = re.sub(r"`[^`\n]*`", "", prose(text))  # inline code: `[x](y)` there is not a link
    return LINK.findall(body) + REFERENCE.findall(body)


def broken_links(pages: list[Path], root: Path) -> list[str]:
    """'page: target (why)' for each relative link that names no file inside `root`, or an anchor that
    no heading of its target page makes. Links with a scheme (https:, mailto:) are not checked."""
    broken = []
    for page in pages:
        for target in links(page.read_text(encoding="utf-8")):
            if SCHEME.match(target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / unquote(path)).resolve() if path else page
            where = f"{page.relative_to(root)}: {target}"
            if not dest.is_relative_to(root.resolve()):
                broken.append(f"{where} (outside the repository)")
            elif not dest.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and dest.suffix != ".md":
                broken.append(f"{where} (an anchor into a file that is not a Markdown page)")
            elif anchor and unquote(anchor) not in anchors(dest.read_text(encoding="utf-8")):
                broken.append(f"{where} (no heading makes #{anchor})")
    return broken


def test_every_relative_link_and_anchor_of_the_docs_resolves():
    assert len(PAGES) >= 10
    assert sum(len(links(p.read_text(encoding="utf-8"))) for p in PAGES) >= 40  # the pages do link
    assert broken_links(PAGES, ROOT) == []


def test_the_link_check_fails_on_a_broken_link_or_anchor(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "guide.md").write_text(
        "# Guide\n\n## Set up\n\ntext\n\n## Set up\n\n## What's `new`, in [v2](../README.md)?\n\n"
        "```sh\n# not a heading\n```\n",
        encoding="utf-8",
    )
    (tmp_path / "README.md").write_text(
        "# Read me\n\n"
        "[ok](docs/guide.md) [ok](docs/guide.md#set-up) [ok](docs/guide.md#set-up-1)\n"
        "[ok](docs/guide.md#whats-new-in-v2) [ok](#read-me) ![ok](docs) [web](https://example.org/x#y)\n"
        "[gone](docs/missing.md) [bad anchor](docs/guide.md#set-up-2) [code](docs/guide.md#not-a-heading)\n"
        "[self](#nothing) [up](../elsewhere.md) [folder anchor](docs#x)\n\n"
        "`[not a link](nowhere.md)`\n\n```md\n[not a link either](nowhere.md)\n```\n\n"
        "[ref]: docs/gone-too.md\n",
        encoding="utf-8",
    )
    pages = [tmp_path / "README.md", tmp_path / "docs" / "guide.md"]
    assert broken_links(pages, tmp_path) == [
        "README.md: docs/missing.md (no such file)",
        "README.md: docs/guide.md#set-up-2 (no heading makes #set-up-2)",
        "README.md: docs/guide.md#not-a-heading (no heading makes #not-a-heading)",
        "README.md: #nothing (no heading makes #nothing)",
        "README.md: ../elsewhere.md (outside the repository)",
        "README.md: docs#x (an anchor into a file that is not a Markdown page)",
        "README.md: docs/gone-too.md (no such file)",
    ]


def test_slugs_follow_githubs_rules():
    text = "# A b\n## A b\n## A b\n## Chapter 5: the book's run, reproduced\n## `llm.book`: 2–7 & E_x\n"
    assert anchors(text) == {"a-b", "a-b-1", "a-b-2", "chapter-5-the-books-run-reproduced", "llmbook-27--e_x"}


def test_the_readme_is_a_five_minute_read_and_its_first_screen_says_what_to_run_next():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 300
    first_screen = "\n".join(readme.splitlines()[:25])
    for command in ("make repro", "make test", "source .venv/bin/activate", "llm generate", "llm classify",
                    "llm instruct", "llm serve", "llm compare"):  # fmt: skip
        assert command in first_screen, command
    targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M)
    assert {"repro", "test"} <= set(targets)


def test_every_llm_command_of_the_readme_parses():
    """The README's `llm` commands against the real parser: a renamed flag or command fails here."""
    from llm.cli import build_parser

    parser = build_parser()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", readme, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if words[:1] == ["llm"]:
                    commands.append(words)
    assert {c[1] for c in commands} >= {"generate", "classify", "instruct", "export", "serve", "compare"}
    for words in commands:
        parser.parse_args(words[1:])  # exits 2 with argparse's message on a bad flag


# --- docs/experiments.md's readable `dvc exp show` ---------------------------------------------------

STAGES = ["prepare_text", "pretrain", "eval", "finetune_spam", "finetune_instruct", "finetune_dpo", "report"]
STAGE = """\
import json, os, sys, yaml
name = sys.argv[1]
p = yaml.safe_load(open("params.yaml"))
f = 1 + p["train"]["lr"] * p["train"]["batch_size"]  # every metric moves with these two params


def scale(d):
    return {k: scale(v) if isinstance(v, dict) else v * f if type(v) in (int, float) else v for k, v in d.items()}


os.makedirs("metrics", exist_ok=True)
os.makedirs("out", exist_ok=True)
json.dump(scale(json.load(open(f"ref/{name}.json"))), open(f"metrics/{name}.json", "w"))
open(f"out/{name}", "w").write(str(f))
"""


def metrics_file(name: str) -> str:
    """The committed metrics/<name>.json; for finetune_dpo, until its first run is committed, one of the
    shape it writes."""
    try:
        return committed(f"metrics/{name}.json")
    except FileNotFoundError:
        if name != "finetune_dpo":
            raise
        return json.dumps(dpo_metrics())


def documented_exp_show() -> list[str]:
    page = (ROOT / "docs" / "experiments.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- exp-show:begin -->\n```sh\n(.*?)```\n<!-- exp-show:end -->", page, re.S).group(1)
    (line,) = [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    words = shlex.split(line)
    assert words[:3] == ["dvc", "exp", "show"]
    return words


def test_the_readable_view_never_drops_a_param():
    """Its --drop expression keeps every key of params.yaml, so a changed param always shows."""
    words = documented_exp_show()
    drop = re.compile("|".join(words[i + 1] for i, w in enumerate(words) if w == "--drop"))

    def keys(node, prefix=""):
        for k, v in node.items():
            yield from keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]

    params = list(keys(yaml.safe_load(committed("params.yaml"))))
    assert len(params) > 50 and [k for k in params if drop.match(k)] == []
    assert drop.match("Created") and drop.match("llm/model.py") and drop.match("metrics/eval.json:train.loss")
    assert drop.match("train.perplexity") and not drop.match("test.accuracy")
    assert drop.match("train.after.reward_margin") and drop.match("test.before.preference_accuracy")
    assert not drop.match("test.after.preference_accuracy")


def test_the_documented_exp_show_is_narrow_and_names_the_changed_params_and_metrics(tmp_path):
    """A scratch DVC repository with the project's params.yaml, its seven metric files (one stage each,
    every params section declared, each stage depending on the last) and two experiments: the page's
    command prints at most 160 columns (DVC draws the table at its full width when the output is not a
    terminal, as in its pager), the changed params and the headline metrics; `dvc exp show --md` of the
    same repository is far wider."""
    sh, _ = scratch_repo(tmp_path)

    params = committed("params.yaml")
    (tmp_path / "params.yaml").write_text(params)
    (tmp_path / "ref").mkdir()
    for name in STAGES:
        (tmp_path / "ref" / f"{name}.json").write_text(metrics_file(name))
    (tmp_path / "stage.py").write_text(STAGE)
    sections = list(yaml.safe_load(params))
    stages = {}
    for i, name in enumerate(STAGES):
        deps = ["stage.py", f"ref/{name}.json"] + ([f"out/{STAGES[i - 1]}"] if i else [])
        stages[name] = {
            "cmd": f"python stage.py {name}",
            "deps": deps,
            "params": sections,
            "outs": [f"out/{name}"],
            "metrics": [{f"metrics/{name}.json": {"cache": False}}],
        }
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    sh("git", "init", "-q")
    sh("dvc", "init", "-q")
    sh("dvc", "repro", "-q")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "baseline")
    lr = yaml.safe_load(params)["train"]["lr"]
    sh("dvc", "exp", "run", "-q", "-n", "lr-x10", "-S", f"train.lr={lr * 10}")
    sh("dvc", "exp", "run", "-q", "-n", "batch-x2", "-S", f"train.lr={lr}", "-S", "train.batch_size=4")
    shown = json.loads(sh("dvc", "exp", "show", "--json"))
    assert {e["name"] for rev in shown for e in rev.get("experiments") or []} == {"lr-x10", "batch-x2"}

    shown = sh(*documented_exp_show())
    lines = shown.splitlines()
    assert len(lines) >= 5 and max(map(len, lines)) <= 160, shown
    (header,) = [line for line in lines if "Experiment" in line]
    for column in ("train.lr", "train.batch_size", "val.loss", "test.accuracy", "test.rouge_l",
                   "test.after.preference_accuracy"):  # fmt: skip
        assert column in header, (column, shown)
    for unchanged in ("model.emb_dim", "train.seed", "Created", "stage.py", "train.after.", "test.before."):
        assert unchanged not in header, (unchanged, shown)
    assert "lr-x10" in shown and "batch-x2" in shown and "…" not in shown
    wide = sh("dvc", "exp", "show", "--md")
    assert max(map(len, wide.splitlines())) > 1000  # what the page's view replaces
