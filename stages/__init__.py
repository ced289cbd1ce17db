"""The pipeline's stage scripts: `python -m stages.NAME`, one per DVC stage in dvc.yaml.

dvc.yaml's commands call whatever `python` comes first on PATH. Run from a shell where the
project's venv is not active (`.venv/bin/dvc repro`), that is the system's Python, and the first
import of a dependency would end in a traceback (`ModuleNotFoundError: No module named 'tqdm'`);
this check turns it into one line that says what to do instead. It looks for the packages rather
than the project's own metadata: the `*.egg-info` an editable install leaves in the checkout is on
the path of any Python started there, venv or not.
"""

import sys
from importlib.util import find_spec

# What every stage imports, directly or through llm (pyproject.toml installs them; a test keeps them listed there)
REQUIRED = ("pydantic", "ruamel.yaml", "tqdm")


def _absent(name: str) -> bool:
    try:
        return find_spec(name) is None
    except ModuleNotFoundError:  # "ruamel.yaml" without "ruamel"
        return True


missing = [name for name in REQUIRED if _absent(name)]
if missing:
    sys.exit(
        f"stages: {sys.executable} has no {missing[0]!r} module: dvc runs the first `python` on PATH, and this "
        "is not the project's; run `source .venv/bin/activate` first, then `dvc repro` (or run `make repro`)"
    )
