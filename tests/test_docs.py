"""The documentation's code runs: the custom distiller of docs/custom_distiller.md."""
import os
import re
import warnings

import pytest
import torch
import torch.nn.functional as F

from textbrewer import BasicDistiller, DistillationConfig, TrainingConfig
from textbrewer.testing import TinyTransformer, make_classification_data, tiny_adaptor

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


def _first_code_block(name):
    with open(os.path.join(DOCS, name), encoding="utf-8") as handle:
        return re.findall(r"```python\n(.*?)```", handle.read(), flags=re.S)[0]


@pytest.fixture(scope="module")
def cosine_distiller_class():
    namespace = {}
    code = _first_code_block("custom_distiller.md")
    assert len(code.strip().splitlines()) <= 25  # "a custom distiller of about 20 lines"
    exec(compile(code, "docs/custom_distiller.md", "exec"), namespace)
    return namespace["CosineDistiller"]


def _run(distiller_class, tmp_path, **kwargs):
    torch.manual_seed(0)
    teacher = TinyTransformer(vocab_size=12, hidden_size=8, num_layers=2)
    student = TinyTransformer(vocab_size=12, hidden_size=8, num_layers=1)
    data = make_classification_data(16, length=6, vocab_size=12)
    loader = torch.utils.data.DataLoader(
        [{k: v[i] for k, v in data.items()} for i in range(16)], batch_size=4)
    distiller = distiller_class(TrainingConfig(device="cpu", output_dir=str(tmp_path)),
                                DistillationConfig(hard_label_weight=1), teacher, student,
                                tiny_adaptor, tiny_adaptor, **kwargs)
    with distiller:
        distiller.train(torch.optim.SGD(student.parameters(), lr=0.1), loader, num_epochs=1)
    return distiller, student, teacher, loader


def test_custom_distiller_with_zero_weight_is_the_basic_distiller(cosine_distiller_class,
                                                                    tmp_path):
    _, custom, _, _ = _run(cosine_distiller_class, tmp_path / "a", cosine_weight=0.0)
    _, basic, _, _ = _run(BasicDistiller, tmp_path / "b")
    for key, value in basic.state_dict().items():
        torch.testing.assert_close(custom.state_dict()[key], value, rtol=0, atol=0)


def test_custom_distiller_adds_the_cosine_term(cosine_distiller_class, tmp_path):
    distiller, student, teacher, loader = _run(cosine_distiller_class, tmp_path,
                                               cosine_weight=0.5)
    batch = next(iter(loader))
    total, parts = distiller.train_on_batch(batch, {})
    with torch.no_grad():
        first_S = student(**batch)["hidden_states"][-1][:, 0]
        first_T = teacher(**batch)["hidden_states"][-1][:, 0]
    expected = (1 - F.cosine_similarity(first_S, first_T, dim=-1)).mean()
    torch.testing.assert_close(parts["unweighted_cosine"].detach(), expected)
    torch.testing.assert_close(total.detach(), (parts["unweighted_kd_loss"] +
                                                parts["unweighted_hard_label_loss"] +
                                                0.5 * expected).detach())


def _python_sources():
    root = os.path.dirname(DOCS)
    for folder in ("textbrewer", "examples", "benchmarks", "tests"):
        for directory, _, names in os.walk(os.path.join(root, folder)):
            for name in sorted(names):
                if name.endswith(".py"):
                    yield os.path.join(directory, name)


def test_no_source_compiles_with_a_warning():
    """An invalid escape in a docstring (``'\\*'``) warns at every first import
    (a DeprecationWarning up to Python 3.11, a SyntaxWarning from 3.12)."""
    sources = list(_python_sources())
    assert len(sources) > 50
    for path in sources:
        with open(path, encoding="utf-8") as handle:
            source = handle.read()
        with warnings.catch_warnings():
            warnings.simplefilter("error", SyntaxWarning)
            warnings.simplefilter("error", DeprecationWarning)
            compile(source, path, "exec", dont_inherit=True)
