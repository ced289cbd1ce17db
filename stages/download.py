"""Stage download@NAME: fetch one public input named in sources.yaml, verify its sha256.

    python -m stages.download NAME

Reads `sources.yaml` (URL, sha256, zip member); writes `data/raw/NAME/`, holding the one verified
file. A cached DVC output: `dvc pull` or the run-cache restores it without the network.
"""

from pathlib import Path

from llm.errors import ConfigError, run_main
from llm.pipeline.download import fetch_source
from llm.pipeline.sources import load_sources

SOURCES = Path("sources.yaml")
RAW = Path("data/raw")


def main(name: str, sources_path: str | Path = SOURCES) -> Path:
    sources = load_sources(sources_path)
    if name not in sources:
        raise ConfigError(f"{sources_path} has no source {name!r}; it has: {', '.join(sources)}")
    path = fetch_source(sources[name], RAW / name)
    checked = "sha256 verified" if sources[name].sha256 else "a local file without a sha256: not verified"
    print(f"{name}: {path} ({path.stat().st_size:,} bytes, {checked})")
    return path


if __name__ == "__main__":
    run_main("download", main, doc=__doc__, positional=("name", "a key of sources.yaml"))
