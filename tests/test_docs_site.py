"""The documentation site builds (docs/build.sh: offline, warnings are errors) and its
API reference has an entry for every public name: each name in the ``__all__`` of every
public module (no part of its path starts with ``_``) is in the built objects.inv.

Skipped when Sphinx or myst-parser is not installed (``pip install -e ".[docs]"``).
Set TEXTBREWER_DOCS_SITE to an already built site to check it instead of building one.
"""
import importlib
import os
import pkgutil
import subprocess
import sys

import pytest

pytest.importorskip("sphinx")
pytest.importorskip("myst_parser")
from sphinx.util.inventory import InventoryFile  # noqa: E402

import textbrewer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def public_modules():
    names = ["textbrewer"]
    for info in pkgutil.walk_packages(textbrewer.__path__, "textbrewer."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return sorted(names)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    given = os.environ.get("TEXTBREWER_DOCS_SITE")
    if given:
        return given
    output = str(tmp_path_factory.mktemp("docs") / "site")
    result = subprocess.run(["bash", os.path.join(ROOT, "docs", "build.sh"), output],
                            cwd=ROOT, capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=ROOT + os.pathsep
                                     + os.environ.get("PYTHONPATH", "")),
                            timeout=300)
    assert result.returncode == 0, f"docs/build.sh failed:\n{result.stdout}\n{result.stderr}"
    return output


@pytest.fixture(scope="module")
def inventory(site):
    path = os.path.join(site, "objects.inv")
    with open(path, "rb") as stream:
        data = InventoryFile.load(stream, "", os.path.join)
    names = set()
    for kind, entries in (data.data if hasattr(data, "data") else data).items():
        if kind.startswith("py:"):
            names.update(entries)
    return names


def test_the_site_has_a_front_page_and_the_markdown_pages(site):
    assert os.path.isfile(os.path.join(site, "index.html"))
    for name in os.listdir(os.path.join(ROOT, "docs")):
        if name.endswith(".md"):
            assert os.path.isfile(os.path.join(site, name[:-3] + ".html")), name


@pytest.mark.parametrize("module_name", public_modules())
def test_every_public_name_has_a_reference_entry(inventory, module_name):
    module = importlib.import_module(module_name)
    assert f"{module_name}" in inventory  # the module itself
    missing = []
    for name in getattr(module, "__all__", None) or []:
        value = getattr(module, name)
        if type(value) is type(sys):  # an exported submodule: its own page
            found = value.__name__ in inventory
        else:
            found = f"{module_name}.{name}" in inventory
        if not found:
            missing.append(name)
    assert not missing, f"{module_name}.__all__ names without a reference entry: {missing}"
