"""Fill a directory with the inputs of sources.yaml, verified, for LLM_MIRROR (CI caches it).

    python ci/fill_mirror.py DIR

Each input is fetched from its canonical URL and checked against its sha256 in sources.yaml
(`llm.pipeline.mirror.fill_mirror`); one already in DIR that verifies is kept. The CI workflow
runs this when its cache of DIR, keyed on sources.yaml, misses; the pipeline and the tests then
read DIR through LLM_MIRROR and never reach the inputs' hosts.
"""

from pathlib import Path

from llm.errors import run_main
from llm.pipeline.mirror import fill_mirror
from llm.pipeline.sources import load_sources

SOURCES = Path(__file__).resolve().parents[1] / "sources.yaml"


def main(directory: str, sources: str | Path = SOURCES) -> list[Path]:
    files = fill_mirror(load_sources(sources), directory)
    for file in files:
        print(f"{file} ({file.stat().st_size:,} bytes, verified)")
    return files


if __name__ == "__main__":
    run_main("ci/fill_mirror.py", main, doc=__doc__, positional=("directory", "the mirror directory to fill"))
