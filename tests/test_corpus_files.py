"""`data.corpus` entries that are local files, directories or glob patterns: which files, in which
order, and one line naming the entry when there are none."""

import json
from pathlib import Path

import pytest

from llm.corpus import expand_corpus
from llm.data import read_tokens
from llm.errors import LLMError
from llm.pipeline.params import load_params, parse_params
from llm.pipeline.sources import is_location
from llm.tokenizer import encode
from stages import prepare_text
from tests.conftest import committed_yaml

TREE = [
    "books/b.txt",
    "books/a/z.txt",
    "books/a/b.txt",
    "books/a-c.txt",
    "books/notes.md",
    "books/.hidden.txt",
    "books/.git/HEAD.txt",
    "books/a/.cache/x.txt",
    "books/empty/.keep",
]


@pytest.fixture
def tree(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for rel in TREE:
        Path(rel).parent.mkdir(parents=True, exist_ok=True)
        Path(rel).write_text(f"This is {rel}.\n", encoding="utf-8")
    return tmp_path


def rel(files, root="."):
    return [Path(f).relative_to(root).as_posix() for f in files]


def test_a_directory_is_every_visible_file_under_it_in_sorted_relative_path_order(tree):
    expected = ["books/a/b.txt", "books/a/z.txt", "books/a-c.txt", "books/b.txt", "books/notes.md"]
    assert rel(expand_corpus("books")) == expected  # `a/` before `a-c.txt`: component by component
    assert rel(expand_corpus("books/")) == expected
    assert rel(expand_corpus(tree / "books"), tree) == expected
    assert rel(expand_corpus(f"file://{tree / 'books'}"), tree) == expected
    assert rel(expand_corpus("books/.git")) == ["books/.git/HEAD.txt"]  # a hidden folder named as the entry


def test_a_file_is_itself(tree):
    assert rel(expand_corpus("books/.hidden.txt")) == ["books/.hidden.txt"]
    assert rel(expand_corpus(f"file://{tree / 'books/b.txt'}"), tree) == ["books/b.txt"]


def test_globs_expand_sorted_and_skip_hidden_names(tree):
    assert rel(expand_corpus("books/*.txt")) == ["books/a-c.txt", "books/b.txt"]
    assert rel(expand_corpus("books/**/*.txt")) == ["books/a/b.txt", "books/a/z.txt", "books/a-c.txt", "books/b.txt"]
    assert rel(expand_corpus("books/?.txt")) == ["books/b.txt"]
    assert rel(expand_corpus("books/a/[bc].txt")) == ["books/a/b.txt"]
    assert rel(expand_corpus("books/*")) == ["books/a-c.txt", "books/b.txt", "books/notes.md"]  # folders skipped
    assert rel(expand_corpus("books/.*.txt")) == ["books/.hidden.txt"]  # a pattern that spells the dot
    assert rel(expand_corpus("books/a/.cache/*")) == ["books/a/.cache/x.txt"]


def test_a_path_that_exists_is_not_a_pattern(tree):
    Path("data[1].txt").write_text("literal")
    Path("data1.txt").write_text("what the pattern would match")
    assert rel(expand_corpus("data[1].txt")) == ["data[1].txt"]
    Path("data[1].txt").unlink()
    assert rel(expand_corpus("data[1].txt")) == ["data1.txt"]


@pytest.mark.parametrize(
    "entry, message",
    [
        ("nope/*.txt", "data.corpus entry 'nope/*.txt' matches no file (a glob matches regular files; `*` and `**` "
                       "skip names starting with a dot)"),
        ("books/*.rst", "data.corpus entry 'books/*.rst' matches no file"),
        ("books/a/*/", "data.corpus entry 'books/a/*/' matches no file"),  # matches a hidden folder at most
        ("books/empty", "data.corpus entry 'books/empty' is a directory with no files (hidden files and "
                        "directories are skipped)"),
        ("missing.txt", "data.corpus entry 'missing.txt': no such file or directory ({tree}/missing.txt)"),
        ("/dev/null", "data.corpus entry '/dev/null' is neither a regular file nor a directory"),
    ],
)  # fmt: skip
def test_an_entry_without_files_is_one_line_naming_it(tree, entry, message):
    with pytest.raises(LLMError) as err:
        expand_corpus(entry, f"data.corpus entry {entry!r}")
    assert str(err.value).startswith(message.format(tree=tree)) and "\n" not in str(err.value), str(err.value)


def test_the_entry_names_itself_by_default(tree):
    with pytest.raises(LLMError, match=r"^corpus entry 'x/\*' matches no file"):
        expand_corpus("x/*")


def test_globs_and_paths_are_locations_not_source_names():
    for entry in ("books/", "./books", "*.txt", "books*", "part?", "[ab]", "c.txt", "file:c", "https://h/x"):
        assert is_location(entry), entry
    for name in ("the-verdict", "tinyshakespeare", "books"):
        assert not is_location(name), name


# --- the stage -------------------------------------------------------------------------------------
def write_params(corpus, ratio=0.5):
    raw = committed_yaml("params.yaml")
    raw["data"].update(corpus=corpus, train_ratio=ratio)
    Path("params.yaml").write_text(json.dumps(raw))  # JSON is YAML
    return parse_params(raw)


def test_prepare_text_joins_every_file_of_dirs_globs_and_paths_in_order(tree, monkeypatch):
    words = "Every effort moves you toward the picture, said Gisburn.\n"
    for i, name in enumerate(["books/b.txt", "books/a/z.txt", "books/a/b.txt", "books/a-c.txt", "books/notes.md"]):
        Path(name).write_text(f"{name}: " + words * (20 + i), encoding="utf-8")
    Path("extra.txt").write_text("extra " + words * 20, encoding="utf-8")
    monkeypatch.setattr(prepare_text, "fetch", None)  # local entries are read in place, never fetched
    write_params(["books/a", "books/*.txt", "extra.txt"])
    files, names = prepare_text.corpus_files(load_params("params.yaml"), scratch=None)
    order = ["books/a/b.txt", "books/a/z.txt", "books/a-c.txt", "books/b.txt", "extra.txt"]
    assert rel(files) == order
    assert names == ["data.corpus entry 'books/a'"] * 2 + ["data.corpus entry 'books/*.txt'"] * 2 + [
        "data.corpus entry 'extra.txt'"
    ]
    metrics = prepare_text.main()
    whole = "<|endoftext|>".join(Path(f).read_text(encoding="utf-8") for f in order)
    split = int(0.5 * len(whole))
    assert read_tokens("data/tokens/train.bin").tolist() == encode(whole[:split])
    assert read_tokens("data/tokens/val.bin").tolist() == encode(whole[split:])
    assert metrics["train"]["chars"] + metrics["val"]["chars"] == len(whole)


def test_prepare_text_stops_on_an_entry_that_matches_nothing(tree):
    write_params(["books/a", "books/*.rst"])
    with pytest.raises(LLMError) as err:
        prepare_text.main()
    assert str(err.value).startswith("data.corpus entry 'books/*.rst' matches no file")
    assert not Path("data").exists()
