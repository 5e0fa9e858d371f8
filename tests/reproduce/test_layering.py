"""The maths packages import no plotting, command-line or training-framework module."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import torch_coherence

PACKAGE = Path(torch_coherence.__file__).parent
#: argparse is not checked in sys.modules: torch itself imports it.
FRAMEWORKS = ("matplotlib", "lightning", "pytorch_lightning", "tensorboard", "transformers")
FORBIDDEN = (*FRAMEWORKS, "argparse")
MATHS = ("dynamics", "theory", "coherence", "linalg", "reproduce")
IMPORT = re.compile(r"^\s*(?:import|from)\s+([A-Za-z_][\w.]*)", re.MULTILINE)


def _loaded() -> tuple[list[str], list[str]]:
    """sys.modules after importing every maths package, then after torch_coherence.plotting
    (one fresh interpreter: if none of them loads a framework, together they do not)."""
    mods = [f"torch_coherence.{name}" for name in MATHS]
    code = (
        "import importlib, json, sys\n"
        f"for m in {mods!r}: importlib.import_module(m)\n"
        "first = sorted(sys.modules)\n"
        "importlib.import_module('torch_coherence.plotting')\n"
        "print(json.dumps([first, sorted(sys.modules)]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)  # fmt: skip
    first, second = json.loads(proc.stdout.strip().splitlines()[-1])
    return first, second


def _sources(name: str) -> list[Path]:
    path = PACKAGE / name
    return sorted(path.rglob("*.py")) if path.is_dir() else [path.with_suffix(".py")]


def test_maths_sources_import_none_of_them_even_lazily():
    """A static scan: no import statement of a forbidden module anywhere in the maths,
    except the reproduction figures' one drawing module."""
    allowed = {PACKAGE / "reproduce" / "plot.py": {"matplotlib"}}
    for name in MATHS:
        for file in _sources(name):
            roots = {m.split(".")[0] for m in IMPORT.findall(file.read_text())}
            bad = (roots & set(FORBIDDEN)) - allowed.get(file, set())
            assert not bad, f"{file.relative_to(PACKAGE)} imports {sorted(bad)}"


def test_importing_the_maths_loads_no_framework():
    loaded, with_plotting = _loaded()
    bad = sorted({m.split(".")[0] for m in loaded if m.split(".")[0] in FRAMEWORKS})
    assert not bad, f"importing the maths packages loads {bad}"
    assert "torch_coherence.cli" not in loaded
    assert "torch_coherence.reproduce.plot" not in loaded
    assert "matplotlib" in with_plotting  # the check sees a module that does load it


def test_the_static_scan_can_fail():
    text = (PACKAGE / "cli" / "reproduce.py").read_text()
    assert "argparse" in {m.split(".")[0] for m in IMPORT.findall(text)}
