"""`sources.yaml`: where each public input comes from (URL, sha256, zip member). Not a parameter.

Only the download stage reads it; every other stage finds a source's bytes under
`data/raw/<name>/`. A `data.corpus` or `finetune_instruct.data` entry is either such a name or a
location of the user's own (`is_location`).
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, RootModel, field_validator, model_validator

from llm.pipeline.validate import Settings, load, validate


def is_local(url: str) -> bool:
    """Whether `url` is a local path or a file:// URL (a user's own file), as the download reads it."""
    return url.startswith("file:") or "://" not in url


class Source(Settings):
    url: str = Field(min_length=1)
    """https:// URL, file:// URL or local path."""
    sha256: str | None = None
    """sha256 of the file (of the member, for a zip); null only for a local path or file:// URL."""
    member: str | None = Field(None, min_length=1)
    """For a zip: the file inside it (required for a URL ending in .zip)."""

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", value):
            raise ValueError(f"must be 64 hex digits, got {value!r}")
        return value

    @model_validator(mode="after")
    def _verifiable(self) -> Source:
        if self.sha256 is None and not is_local(self.url):
            raise ValueError(
                f"sha256 is missing for {self.url}: a download must be verified; set it to the file's sha256 "
                "(of the member, for a zip). Only a local path or file:// URL may go without one"
            )
        if self.member is None and urlsplit(self.url).path.lower().endswith(".zip"):
            raise ValueError(f"member is missing for {self.url}: a .zip URL needs the name of the file inside it")
        return self


class Sources(RootModel[dict[str, Source]]):
    pass


def parse_sources(raw) -> dict[str, Source]:
    """Validate a parsed sources.yaml: `{name: {url, sha256, member?}}`."""
    return validate(Sources, raw).root


def load_sources(path: str | Path = "sources.yaml") -> dict[str, Source]:
    return load(Sources, path).root


def is_location(entry: str) -> bool:
    """Whether a corpus/data entry is a URL, a path or a glob pattern rather than the name of a
    source: it holds a `/` or a glob character (`*?[`), starts with a scheme or has a suffix."""
    return (
        "/" in entry
        or any(c in entry for c in "*?[")
        or entry.startswith(("http://", "https://", "file:"))
        or bool(Path(entry).suffix)
    )


def data_file(value: str, what: str, raw: str | Path = "data/raw") -> Path:
    """The file a stage's `data` setting names: a source's download (`raw/<name>/`, from sources.yaml) or
    an existing file; `what` names the setting (e.g. "finetune_instruct.data 'x.json'")."""
    from llm.errors import LLMError
    from llm.pipeline.download import source_file

    if not is_location(value):
        return source_file(Path(raw) / value, what)
    path = Path(value)
    if not path.is_file():
        raise LLMError(f"{what} is neither a name in sources.yaml nor an existing file")
    return path
