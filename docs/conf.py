"""Sphinx configuration of the textbrewer documentation site.

Build with ``bash docs/build.sh OUTPUT_DIR`` (offline, warnings are errors).

Nothing here lists the package's symbols by hand:

* the API reference (``api/``) is generated at every build, one page per public module
  (every module of the package whose dotted path has no part starting with ``_``), each an
  ``automodule`` whose members are the module's ``__all__``;
* every Markdown page directly under ``docs/`` that no toctree names yet is added to the
  "More" toctree of the front page.
"""
import importlib
import inspect
import os
import pkgutil
import re
import sys
import typing

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import textbrewer  # noqa: E402

project = "textbrewer"
author = "the textbrewer authors"
copyright = "the textbrewer authors, Apache-2.0"
release = version = textbrewer.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "README.md"]
templates_path = []

# -- Markdown (MyST) -------------------------------------------------------------------
myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3

# -- autodoc / napoleon ----------------------------------------------------------------
autodoc_default_options = {
    "members": True,
    "undoc-members": True,
    "show-inheritance": True,
    "member-order": "bysource",
}
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autoclass_content = "class"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True
python_use_unqualified_type_names = True

# -- references --------------------------------------------------------------------------
# No intersphinx: the build is offline. References to other projects' names (torch, numpy,
# the standard library) cannot resolve and are ignored here; this package's own names are
# never ignored, so a broken reference to them fails the build.
nitpicky = True
_EXTERNAL = ("torch", "nn", "np", "numpy", "typing", "collections", "os", "logging", "tqdm",
             "dataclasses", "enum", "pathlib", "json", "io", "abc", "types", "transformers",
             "contextlib", "functools", "argparse", "tempfile")
nitpick_ignore_regex = [
    (r"py:.*", r"(%s)(\..*)?" % "|".join(re.escape(name) for name in _EXTERNAL)),
    # bare names of external types as they appear in signatures and docstrings
    (r"py:.*", r"(Tensor|Module|Parameter|Optimizer|DataLoader|Dataset|ndarray|dtype|device|"
               r"Logger|LogRecord|PathLike|TextIO|StreamHandler|MutableMapping|Mapping|"
               r"Sequence|Iterable|Iterator|Callable|NamedTuple|TypeVar|ConfigT|"
               r"SummaryWriter|GradScaler|ProcessGroup|Function)"),
]

# -- HTML ---------------------------------------------------------------------------------
html_theme = "alabaster"
html_title = f"textbrewer {release}"
html_static_path = []
html_theme_options = {
    "description": "Knowledge distillation for PyTorch, compatible with TextBrewer 0.2.1",
    "fixed_sidebar": True,
}


# -- the API reference, generated ---------------------------------------------------------
def public_modules():
    """Every importable module of the package whose path has no part starting with '_'."""
    names = ["textbrewer"]
    for info in pkgutil.walk_packages(textbrewer.__path__, "textbrewer."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return sorted(names)


def _documented_constants(module_name):
    """Module-level names with a ``#:`` doc comment (e.g. the registries), not in __all__."""
    from sphinx.pycode import ModuleAnalyzer
    try:
        docs = ModuleAnalyzer.for_module(module_name).find_attr_docs()
    except Exception:  # no source
        return []
    return [name for (scope, name) in docs if scope == "" and not name.startswith("_")]


def _exported(module):
    names = list(getattr(module, "__all__", None) or [])
    if names:
        names += [n for n in _documented_constants(module.__name__) if n not in names]
    return names


def _kind(value):
    if inspect.ismodule(value):
        return "module"
    if isinstance(value, type):
        return "exception" if issubclass(value, BaseException) else "class"
    if inspect.isroutine(value) or (callable(value) and hasattr(value, "__wrapped__")):
        return "function"
    return "data"


def _assigns(module_name, member):
    """Whether the module's source assigns ``member`` at top level (where data is defined)."""
    try:
        source = inspect.getsource(importlib.import_module(module_name))
    except (OSError, TypeError):
        return False
    return re.search(rf"^{re.escape(member)}\s*(:[^=\n]*)?=", source, re.M) is not None


def _key(value, member):
    # classes and functions are the same object under every path; values by name too
    if _kind(value) in ("class", "exception", "function"):
        return (id(value),)
    return (id(value), member)


def _homes(modules):
    """Where each public object is documented in full: the module that defines it (its
    docstring's references are written relative to that module), if it exports it; else
    the shortest public path (then the first alphabetically) that exports it."""
    homes, defined = {}, {}
    for name in sorted(modules, key=lambda m: (m.count("."), m)):
        module = importlib.import_module(name)
        for member in _exported(module):
            value = getattr(module, member)
            key = _key(value, member)
            homes.setdefault(key, f"{name}.{member}")
            if _kind(value) in ("class", "exception", "function"):
                is_home = getattr(value, "__module__", None) == name \
                    and getattr(value, "__name__", None) == member
            else:
                is_home = _assigns(name, member)
            if is_home:
                defined.setdefault(key, f"{name}.{member}")
    homes.update(defined)
    return homes


_ROLE = re.compile(r":(?:py:)?[a-z]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`")


def _summary(value):
    """The first paragraph of a docstring, its cross-references as plain literals."""
    doc = inspect.getdoc(value) or ""
    paragraph = doc.split("\n\n", 1)[0].strip()
    return " ".join(_ROLE.sub(r"``\1``", paragraph).split())


def _module_page(name, homes):
    module = importlib.import_module(name)
    title = f"``{name}``"
    lines = [title, "=" * len(title), "", f".. automodule:: {name}", "   :no-members:", ""]
    exported = _exported(module)
    if not exported:
        return "\n".join(lines)  # 0.2.1's import paths: the module docstring says it all
    lines += [f".. py:currentmodule:: {name}", ""]
    for member in exported:
        value = getattr(module, member)
        kind = _kind(value)
        if kind == "module":
            lines += [f"``{member}``: the module :mod:`{value.__name__}`.", ""]
            continue
        home = homes[_key(value, member)]
        if home != f"{name}.{member}":
            summary = _summary(value) if kind != "data" else ""
            lines += [f".. py:{kind}:: {member}", "",
                      f"   Documented as :py:obj:`{home}`." + (f" {summary}" if summary else ""),
                      ""]
            continue
        lines += [f".. auto{kind}:: {name}.{member}"]
        if kind == "data" and (len(repr(value)) > 70 or " at 0x" in repr(value)):
            lines += ["   :no-value:"]
        lines += [""]
    return "\n".join(lines)


def _write_if_changed(path, text):
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            if handle.read() == text:
                return
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def generate_api_pages(app=None):
    folder = os.path.join(HERE, "api")
    os.makedirs(folder, exist_ok=True)
    modules = public_modules()
    homes = _homes(modules)
    for name in modules:
        _write_if_changed(os.path.join(folder, f"{name}.rst"), _module_page(name, homes))
    for stale in os.listdir(folder):
        if stale.endswith(".rst") and stale != "index.rst" and stale[:-4] not in modules:
            os.unlink(os.path.join(folder, stale))
    index = ["API reference", "=============", "",
             "Generated from the docstrings: one page per module, listing the names in its",
             "``__all__``. The names most scripts need are re-exported by the top-level",
             ":mod:`textbrewer` package.", "",
             ".. toctree::", "   :maxdepth: 1", ""]
    index += [f"   {name}" for name in modules]
    _write_if_changed(os.path.join(folder, "index.rst"), "\n".join(index) + "\n")


# -- pages no toctree names yet: the front page's "More" toctree ---------------------------
_TOCTREE = re.compile(r"^(```|:::)\{toctree\}[^\n]*\n(.*?)^\1", re.M | re.S)
OTHER_PAGES_MARKER = "other-pages-go-here"


def _toctree_entries():
    named = set()
    for folder, _, files in os.walk(HERE):
        for file in files:
            if not file.endswith(".md"):
                continue
            with open(os.path.join(folder, file), encoding="utf-8") as handle:
                text = handle.read()
            relative = os.path.relpath(folder, HERE)
            for block in _TOCTREE.finditer(text):
                for line in block.group(2).splitlines():
                    line = line.strip()
                    if not line or line.startswith(":"):
                        continue
                    target = line.rsplit("<", 1)[-1].rstrip(">").strip()
                    if relative != ".":
                        target = os.path.normpath(os.path.join(relative, target))
                    named.add(target.replace(os.sep, "/"))
    return named


def other_pages():
    named = _toctree_entries() | {"index"}
    pages = sorted(file[:-3] for file in os.listdir(HERE)
                   if file.endswith(".md") and file[:-3] not in named)
    return pages


def _fill_other_pages(app, docname, source):
    if docname == root_doc and OTHER_PAGES_MARKER in source[0]:
        source[0] = source[0].replace(OTHER_PAGES_MARKER, "\n".join(other_pages()))


def _no_inline_attribute_type(app, what, name, obj, options, lines):
    """napoleon reads an attribute docstring "Text: more" as "Type: description"; ours
    never start with a type. An empty comment as the first line keeps the whole text as
    the description (napoleon skips blank lines, not comments)."""
    if what in ("attribute", "data", "property") and lines and ":" in lines[0]:
        lines[:0] = ["..", ""]


def _no_borrowed_docstring(app, what, name, obj, options, lines):
    """A value without a ``#:`` comment would show its type's docstring (a dict's, a
    Registry's): not about this value, so nothing is shown."""
    if what in ("data", "attribute") and lines and not isinstance(obj, type) \
            and not callable(getattr(obj, "__wrapped__", None)):
        borrowed = getattr(type(obj), "__doc__", None)
        borrowed = inspect.cleandoc(borrowed) if isinstance(borrowed, str) else ""
        if borrowed and "\n".join(lines).strip() == borrowed.strip():
            lines[:] = []


def _type_variables_as_text(app, env, node, contnode):
    """A type variable in a signature (``ConfigT``) is not a documented object: plain text."""
    target = node.get("reftarget", "")
    if node.get("refdomain") != "py" or not target.startswith("textbrewer."):
        return None
    module_name, _, attribute = target.rpartition(".")
    try:
        value = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError):
        return None
    return contnode if isinstance(value, typing.TypeVar) else None


def setup(app):
    app.connect("autodoc-process-docstring", _no_borrowed_docstring, priority=390)
    app.connect("missing-reference", _type_variables_as_text)
    app.connect("autodoc-process-docstring", _no_inline_attribute_type, priority=400)
    app.connect("builder-inited", generate_api_pages)
    app.connect("source-read", _fill_other_pages)
