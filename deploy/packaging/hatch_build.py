"""Hatch build hook: install the card's folders as subpackages of one ``dspex`` package.

The repository keeps the product card's top-level folders (``streams/``,
``agents/``, ``schemas/``); installed, they are ``dspex.streams``,
``dspex.agents`` and ``dspex.schemas``, so DSPex never takes a generic
top-level import name (``agents`` is also the OpenAI Agents SDK's).
``dspex/__init__.py`` is ``streams/__init__.py`` installed a second time: the
public API (``from dspex import Client``) is the client library's.

- wheel: ``sources`` in pyproject.toml maps each folder under ``dspex/``; this
  hook adds a copy of ``streams/__init__.py`` as ``dspex/__init__.py``. A copy,
  because hatch leaves a force-included project file out of its own place:
  ``dspex/streams/__init__.py`` would be missing and ``dspex.streams`` would
  install as a namespace package.
- editable (``pip install -e .``): hatch cannot add a prefix to a path in dev
  mode, so this hook links ``build/dev/dspex/`` to the folders (relative
  symlinks) and pyproject's ``dev-mode-dirs`` puts ``build/dev`` on
  ``sys.path``. mypy reads the same tree (``mypy_path``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

FOLDERS = ("streams", "agents", "schemas")
DEV_TREE = Path("build") / "dev" / "dspex"


def link_dev_tree(root: Path) -> Path:
    """(Re)create ``build/dev/dspex`` as relative symlinks to the source folders."""
    tree = root / DEV_TREE
    tree.mkdir(parents=True, exist_ok=True)
    links = {name: Path(name) for name in FOLDERS}
    links["__init__.py"] = Path("streams") / "__init__.py"
    for name, target in links.items():
        link = tree / name
        relative = Path(os.path.relpath(root / target, tree))
        if link.is_symlink() and Path(os.readlink(link)) == relative:
            continue
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(relative)
    return tree


class DSPexLayout(BuildHookInterface):  # type: ignore[type-arg]
    """Adds ``dspex/__init__.py`` to wheels; links the dev tree for editable installs."""

    PLUGIN_NAME = "custom"
    _copies: Path | None = None

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":
            return
        if version == "editable":
            link_dev_tree(Path(self.root))
            return
        # Outside the project, so hatch still ships streams/__init__.py in its own place.
        self._copies = Path(tempfile.mkdtemp(prefix="dspex-build-"))
        package_init = self._copies / "__init__.py"
        shutil.copyfile(Path(self.root) / "streams" / "__init__.py", package_init)
        build_data["force_include"][str(package_init)] = "dspex/__init__.py"

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        if self._copies is not None:
            shutil.rmtree(self._copies, ignore_errors=True)
            self._copies = None
