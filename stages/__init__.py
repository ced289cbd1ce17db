"""The pipeline's stage scripts: `python -m stages.NAME`, one per DVC stage in dvc.yaml.

dvc.yaml's commands call whatever `python` comes first on PATH. Run from a shell where the
project's venv is not active (`.venv/bin/dvc repro`), that is the system's Python, and the first
import of a dependency would end in a traceback (`ModuleNotFoundError: No module named 'tqdm'`);
this check turns it into one line that says what to do instead.
"""

import sys
from importlib.metadata import PackageNotFoundError, distribution

try:
    distribution("llm-from-scratch-dvc")  # pyproject.toml's name: `make install` puts it in .venv
except PackageNotFoundError:
    sys.exit(
        f"stages: {sys.executable} does not have this project installed (dvc runs the first `python` on "
        "PATH): run `source .venv/bin/activate` first, then `dvc repro` (or run `make repro`)"
    )
