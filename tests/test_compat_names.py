"""TextBrewer 0.2.1 names brought back: textbrewer.presets' namespace (losses, schedulers,
cycle, projections, DynamicKeyDict, ...) and textbrewer.utils' cycle, initializer_builder
and LayerNode.

With ``TEXTBREWER_POST1_SRC`` (or ``TEXTBREWER021_SRC``) pointing at the original's
``src/textbrewer`` folder, the original's presets namespace is read from its sources and
its utils.py is loaded by path (it imports only torch) to compare LayerNode tables, cycle
and initializer_builder.
"""
import ast
import importlib.util
import os
import warnings
from itertools import islice

import pytest
import torch
from torch import nn

import textbrewer
from textbrewer import losses, presets, projections, schedulers, utils
from textbrewer.presets import DynamicKeyDict
from textbrewer.utils import LayerNode, cycle, initializer_builder

# the files read here are the same in 0.2.1.post1 (the reference) and 0.2.1
ORIGINAL_SRC = os.environ.get("TEXTBREWER_POST1_SRC") or os.environ.get("TEXTBREWER021_SRC")
PACKAGE_DIR = os.path.dirname(os.path.abspath(textbrewer.__file__))

LOSS_NAMES = ["kd_mse_loss", "kd_ce_loss", "att_mse_loss", "att_mse_sum_loss", "att_ce_loss",
              "att_ce_mean_loss", "hid_mse_loss", "cos_loss", "pkd_loss", "fsp_loss",
              "mmd_loss"]
SCHEDULER_NAMES = ["linear_growth_weight_scheduler", "linear_decay_weight_scheduler",
                   "constant_temperature_scheduler", "flsw_temperature_scheduler_builder",
                   "cwsm_temperature_scheduler_builder"]
# Everything else 0.2.1's presets.py defined or imported at module level.
OTHER_PRESET_NAMES = ["cycle", "linear_projection", "projection_with_activation",
                      "DynamicKeyDict", "TEMPERATURE_SCHEDULER", "FEATURES", "ADAPTOR_KEYS",
                      "KD_LOSS_MAP", "MATCH_LOSS_MAP", "PROJ_MAP", "WEIGHT_SCHEDULER", "MAPS",
                      "register_new", "mask_dtype"]
MODULE_ALIASES = ["torch", "F", "List", "collections"]  # reachable, not star-exported


# ================================================================= presets namespace
@pytest.mark.parametrize("name", LOSS_NAMES + SCHEDULER_NAMES + OTHER_PRESET_NAMES
                         + MODULE_ALIASES)
def test_textbrewer021_presets_names_resolve(name):
    assert getattr(presets, name) is not None


def test_star_import_gives_the_textbrewer021_names():
    namespace = {}
    exec("from textbrewer.presets import *", namespace)
    missing = [n for n in LOSS_NAMES + SCHEDULER_NAMES + OTHER_PRESET_NAMES if n not in namespace]
    assert missing == []
    assert len(presets.__all__) == len(set(presets.__all__))


def test_presets_names_are_the_package_objects():
    for name in LOSS_NAMES:
        assert getattr(presets, name) is getattr(losses, name)
    for name in SCHEDULER_NAMES:
        assert getattr(presets, name) is getattr(schedulers, name)
    assert presets.cycle is utils.cycle
    assert presets.linear_projection is projections.linear_projection
    assert presets.projection_with_activation is projections.projection_with_activation
    assert presets.mask_dtype is torch.bool  # 0.2.1 on torch >= 1.2


def _top_level_names(path):
    """Public names a module binds at top level (star imports not followed)."""
    with open(path, encoding="utf-8") as handle, warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)  # the original's docstrings ('\\c')
        warnings.simplefilter("ignore", DeprecationWarning)
        tree = ast.parse(handle.read())
    names, star_modules = set(), []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                if alias.name == "*":
                    star_modules.append(node.module)
                else:
                    names.add((alias.asname or alias.name).split(".")[0])
    return {n for n in names if not n.startswith("_")}, star_modules


def test_every_public_name_of_textbrewer021_presets_resolves():
    if not ORIGINAL_SRC:
        pytest.skip("neither TEXTBREWER_POST1_SRC nor TEXTBREWER021_SRC is set")
    names, star_modules = _top_level_names(os.path.join(ORIGINAL_SRC, "presets.py"))
    for module in star_modules:  # 'losses', 'schedulers' (no __all__ there)
        names |= _top_level_names(os.path.join(ORIGINAL_SRC, module + ".py"))[0]
    assert set(LOSS_NAMES + SCHEDULER_NAMES) <= names
    missing = sorted(n for n in names if not hasattr(presets, n))
    assert missing == []


# ==================================================================== DynamicKeyDict
def _scale_builder(k, offset=0):
    return lambda x: k * x + offset


def test_dynamic_key_dict():
    store = {"scale": _scale_builder, "one": 1}
    d = DynamicKeyDict(store)
    assert d["one"] == 1
    assert d[["scale", 3]](2) == 6
    assert d[("scale", 3, 1)](2) == 7
    assert d[["scale", {"k": 4, "offset": 2}]](2) == 10
    assert "scale" in d and ["scale", 1] in d and ("one",) in d and "two" not in d
    d["two"] = 2
    assert store["two"] == 2 and d.store is store
    with pytest.raises(KeyError):
        d["missing"]


def test_dynamic_key_dict_builds_our_temperature_schedules():
    d = DynamicKeyDict({"constant": schedulers.constant_temperature_scheduler,
                        "flsw": schedulers.flsw_temperature_scheduler_builder,
                        "cwsm": schedulers.cwsm_temperature_scheduler_builder})
    logits_S, logits_T = torch.randn(3, 4), torch.randn(3, 4)
    assert d["constant"](logits_S, logits_T, 2.0) == 2.0
    torch.testing.assert_close(d[["flsw", 1, 2]](logits_S, logits_T, 2.0),
                               presets.TEMPERATURE_SCHEDULER[["flsw", 1, 2]](logits_S, logits_T,
                                                                             2.0))
    torch.testing.assert_close(d[("cwsm", {"beta": 1})](logits_S, logits_T, 2.0),
                               schedulers.cwsm_temperature_scheduler_builder(1)(
                                   logits_S, logits_T, 2.0))


def test_dynamic_key_dict_like_textbrewer021():
    if not ORIGINAL_SRC:
        pytest.skip("neither TEXTBREWER_POST1_SRC nor TEXTBREWER021_SRC is set")
    with open(os.path.join(ORIGINAL_SRC, "presets.py"), encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    class_def = next(n for n in tree.body
                     if isinstance(n, ast.ClassDef) and n.name == "DynamicKeyDict")
    namespace = {}
    exec(compile(ast.Module(body=[class_def], type_ignores=[]), "presets.py", "exec"),
         namespace)
    theirs = namespace["DynamicKeyDict"]({"scale": _scale_builder, "one": 1})
    ours = DynamicKeyDict({"scale": _scale_builder, "one": 1})
    assert ours["one"] == theirs["one"]
    for key in (["scale", 3], ("scale", 3, 1), ["scale", {"k": 4, "offset": 2}]):
        assert ours[key](2) == theirs[key](2)
    for key in ("scale", ["scale"], ("one", 5), "two", ["two"]):
        assert (key in ours) == (key in theirs)


# ============================================================================ utils
def test_utils_all():
    for name in ("cycle", "initializer_builder", "LayerNode"):
        assert name in utils.__all__ and hasattr(utils, name)


def test_cycle_cycles():
    assert list(islice(cycle([1, 2, 3]), 8)) == [1, 2, 3, 1, 2, 3, 1, 2]
    assert list(islice(cycle("ab"), 5)) == ["a", "b", "a", "b", "a"]


class _Passes:
    """An iterable that yields its pass number with each item."""

    def __init__(self):
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        return iter([(self.passes, "x"), (self.passes, "y")])


def test_cycle_iterates_afresh_each_pass():
    source = _Passes()
    items = list(islice(cycle(source), 5))
    assert items == [(1, "x"), (1, "y"), (2, "x"), (2, "y"), (3, "x")]
    assert source.passes == 3


def test_cycle_reshuffles_a_dataloader_each_pass():
    data = list(range(6))
    torch.manual_seed(0)
    items = list(islice(cycle(torch.utils.data.DataLoader(data, batch_size=3, shuffle=True)),
                        4))
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(data, batch_size=3, shuffle=True)
    expected = list(loader) + list(loader)
    assert all(torch.equal(a, b) for a, b in zip(items, expected))


def test_cycle_of_nothing_raises_instead_of_hanging():
    with pytest.raises(ValueError, match="no items"):
        next(cycle([]))
    once = cycle(iter([1, 2]))  # a one-shot iterator: one pass, then nothing
    assert [next(once), next(once)] == [1, 2]
    with pytest.raises(ValueError, match="no items"):
        next(once)


def test_initializer_builder_is_the_projections_one():
    assert initializer_builder is projections.initializer_builder
    torch.manual_seed(0)
    layer = nn.Linear(400, 300)
    initializer_builder(0.02)(layer)
    assert torch.all(layer.bias == 0)
    assert abs(layer.weight.std().item() - 0.02) < 1e-3
    assert abs(layer.weight.mean().item()) < 1e-3


def _imports_of(module_path):
    with open(module_path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = os.path.dirname(module_path)
            for _ in range(node.level - 1):
                base = os.path.dirname(base)
            parts = node.module.split(".") if node.module else []
            targets = ([os.path.join(base, *parts)] if parts
                       else [os.path.join(base, a.name) for a in node.names])
            found.extend(targets)
    return found


def _package_modules_reached(start):
    seen, todo = set(), [os.path.join(PACKAGE_DIR, start)]
    while todo:
        stem = todo.pop()
        path = stem + ".py" if os.path.isfile(stem + ".py") else os.path.join(stem,
                                                                              "__init__.py")
        if path in seen or not os.path.isfile(path):
            continue
        seen.add(path)
        todo.extend(_imports_of(path))
    return {os.path.relpath(p, PACKAGE_DIR) for p in seen}


def test_utils_and_data_utils_import_no_distillers():
    reached = _package_modules_reached("utils")
    assert "projections.py" in reached
    assert not any(p.startswith("distillers") or p == "__init__.py" for p in reached), reached
    assert _package_modules_reached("data_utils") == {"data_utils.py"}


# ========================================================================= LayerNode
def _build(node_class, entries):
    """A tree as 0.2.1's display_parameters built it: one node per dotted component."""
    root = node_class("model", fullname="model")
    for key, value in entries:
        names, current = key.split("."), root
        for i, name in enumerate(names):
            if name not in current:
                current[name] = node_class(name, parent=current, fullname=".".join(names[:i + 1]))
            current = current[name]
        current.value = value
        current.update(current.value)
    return root


ENTRIES = [("enc.lin.weight", [6000, 0.25]), ("enc.lin.bias", [20, 0.125]),
           ("out", [1234567, 1.5])]

EXPECTED_TABLE = (
    "\n"
    "LAYER NAME     \t        #PARAMS\t     RATIO\t MEM(MB)\n"
    "--model:       \t      1,240,587\t   100.00%\t    1.88\n"
    "  --enc        \n"
    "    --lin:     \t          6,020\t     0.49%\t    0.38\n"
    "      --weight:\t          6,000\t     0.48%\t    0.25\n"
    "      --bias:  \t             20\t     0.00%\t    0.12\n"
    "  --out:       \t      1,234,567\t    99.51%\t    1.50\n"
)

EXPECTED_TABLE_LEVEL_1 = (
    "\n"
    "LAYER NAME\t        #PARAMS\t     RATIO\t MEM(MB)\n"
    "--model:\t      1,240,587\t   100.00%\t    1.88\n"
    "  --enc:\t          6,020\t     0.49%\t    0.38\n"
    "  --out:\t      1,234,567\t    99.51%\t    1.50\n"
)


def test_layer_node_tree_and_values():
    root = _build(LayerNode, ENTRIES)
    assert root.value == [1240587, 1.875]
    assert root["enc"].value == [6020, 0.375] and root["enc"]["lin"].value == [6020, 0.375]
    assert "enc" in root and "lin" not in root
    assert root["enc"]["lin"]["bias"].fullname == "enc.lin.bias"
    assert root["enc"]["lin"].parent is root["enc"]
    assert list(root["enc"]["lin"].children_name) == ["weight", "bias"]


def test_layer_node_update_with_numbers():
    root = LayerNode("root")
    child = LayerNode("a", parent=root)
    grandchild = LayerNode("b", parent=child)
    grandchild.update(3)
    grandchild.update(4)
    assert (root.value, child.value, grandchild.value) == (7, 7, None)


def test_layer_node_format_table():
    root = _build(LayerNode, ENTRIES)
    assert root.format() == EXPECTED_TABLE
    assert root.format(max_level=1) == EXPECTED_TABLE_LEVEL_1
    assert root._max_name_length() == 14 and root._max_name_length(max_level=1) == 7


@pytest.fixture(scope="module")
def original_utils():
    if not ORIGINAL_SRC:
        pytest.skip("neither TEXTBREWER_POST1_SRC nor TEXTBREWER021_SRC is set")
    spec = importlib.util.spec_from_file_location("textbrewer021_utils",
                                                  os.path.join(ORIGINAL_SRC, "utils.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.embeddings = nn.Embedding(50, 8)
        self.encoder = nn.ModuleList([nn.Sequential(nn.Linear(8, 16), nn.ReLU(),
                                                    nn.Linear(16, 8), nn.LayerNorm(8))
                                      for _ in range(2)])
        self.pooler = nn.Sequential(nn.Linear(8, 8))
        self.head = nn.Linear(8, 50)
        self.head.weight = self.embeddings.weight  # tied: shown once, then "(shared)"


def _entries_like_textbrewer021(state_dict):
    """0.2.1's display_parameters values; a repeated tensor is [0, 0] under 'name(shared)'."""
    entries, seen = [], set()
    for key, tensor in state_dict.items():
        if tensor.data_ptr() in seen:
            entries.append((key + "(shared)", [0, 0]))
        else:
            seen.add(tensor.data_ptr())
            megabytes = tensor.numel() * tensor.element_size() / 2 ** 20
            entries.append((key, [tensor.numel(), megabytes]))
    return entries


@pytest.mark.parametrize("max_level", [None, 0, 1, 2, 3, 4])
def test_layer_node_format_same_as_textbrewer021(original_utils, max_level):
    model = _Model()
    table_021, _ = original_utils.display_parameters(model, max_level=max_level)
    ours = _build(LayerNode, _entries_like_textbrewer021(model.state_dict()))
    assert ours.format(max_level=max_level) == table_021
    for entries in (ENTRIES, ENTRIES[:1], [("a", [5, 0.1])]):
        assert (_build(LayerNode, entries).format(max_level=max_level)
                == _build(original_utils.LayerNode, entries).format(max_level=max_level))


def test_cycle_and_initializer_same_as_textbrewer021(original_utils):
    assert (list(islice(cycle([1, 2, 3]), 10))
            == list(islice(original_utils.cycle([1, 2, 3]), 10)))
    torch.manual_seed(0)
    ours = nn.Linear(5, 4)
    initializer_builder(0.02)(ours)
    torch.manual_seed(0)
    theirs = nn.Linear(5, 4)
    original_utils.initializer_builder(0.02)(theirs)
    assert torch.equal(ours.weight, theirs.weight) and torch.equal(ours.bias, theirs.bias)
