"""Teacher sources: a local teacher gives the cache writer's rows and trains a student as
the live teacher's top-k does; cache-then-live equals the cache where it has rows and the
live teacher elsewhere (and writes misses back); mixtures equal their manual average;
routing by key; the served source's parsing and errors (its real-server test is
tests/test_served_teacher.py)."""
import copy

import pytest
import torch

from textbrewer import DistillationConfig, TrainingConfig
from textbrewer.cache import IndexedDataset, TeacherCache, pad_collate, write_teacher_cache
from textbrewer.distillers.lm import CausalLMDistiller, LMDistillationConfig
from textbrewer.teachers import (CachedTeacherSource, CacheThenLiveTeacher, LocalTeacher,
                                 MixtureTeacher, RoutedTeacher, ServedTeacher,
                                 TeacherSourceCollator)
from textbrewer.teachers.served import EMPTY_LOGPROB, ServedTeacherError, _Retryable
from textbrewer.testing import TinyTransformer

VOCAB = 13


def dataset(count=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (length,), generator=generator)}
            for length in [5, 3, 6, 4, 6, 2, 5, 3][:count]]


def teacher(seed=0):
    torch.manual_seed(seed)
    return TinyTransformer(vocab_size=VOCAB, hidden_size=8, num_layers=1, num_labels=VOCAB,
                           token_level=True).eval()


def test_local_rows_are_the_cache_writers_rows(tmp_path):
    model, data = teacher(), dataset()
    write_teacher_cache(model, data, str(tmp_path), k=4, batch_size=3)
    cache = TeacherCache(str(tmp_path))
    batch = pad_collate(data)
    rows = LocalTeacher(model, k=4).rows(batch)
    cached = cache.lookup(torch.arange(len(data)), input_ids=batch["input_ids"])
    assert torch.equal(rows["mask"], cached["mask"])
    assert torch.equal(rows["topk_ids"], cached["topk_ids"])
    # the cache stores float16 log-probs; the live rows are the float32 before rounding
    assert torch.equal(rows["topk_logprobs"].half().float(), cached["topk_logprobs"])
    torch.testing.assert_close(rows["tail_mass"], cached["tail_mass"], rtol=1e-3, atol=1e-4)


def test_training_from_a_local_source_equals_the_live_teachers_top_k(tmp_path):
    model, data = teacher(), dataset()

    def run(use_source):
        torch.manual_seed(5)
        student = TinyTransformer(vocab_size=VOCAB, hidden_size=6, num_layers=1,
                                  num_labels=VOCAB, token_level=True)
        collate = TeacherSourceCollator(LocalTeacher(model, k=4)) if use_source else pad_collate
        loader = torch.utils.data.DataLoader(data, batch_size=3, collate_fn=collate)
        distiller = CausalLMDistiller(
            TrainingConfig(device="cpu", output_dir=str(tmp_path / str(use_source)),
                           log_dir=None),
            DistillationConfig(temperature=1.0, hard_label_weight=0.5),
            model_T=None if use_source else model, model_S=student,
            lm_config=LMDistillationConfig(divergence="topk_kl", topk=4,
                                           topk_tail="uniform", path="dense"))
        optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
        with distiller:
            distiller.train(optimizer, loader, num_epochs=2)
        return student.state_dict()
    live, sourced = run(False), run(True)
    for key in live:
        torch.testing.assert_close(sourced[key], live[key], rtol=1e-6, atol=1e-7, msg=key)
    torch.manual_seed(5)
    initial = TinyTransformer(vocab_size=VOCAB, hidden_size=6, num_layers=1, num_labels=VOCAB,
                              token_level=True).state_dict()
    assert any(not torch.equal(live[key], initial[key]) for key in live)  # it trained


class NoTeacher:
    """A live source that must not be asked."""
    k = 4
    vocab_size = VOCAB

    def rows(self, batch, examples):
        raise AssertionError("the live teacher was asked for cached examples")


def test_cache_then_live_equals_the_cache_and_the_live_teacher(tmp_path):
    model, data = teacher(), dataset(8)
    write_teacher_cache(model, data[:4], str(tmp_path), k=4)  # a cache of the first half
    cache = TeacherCache(str(tmp_path))
    live = LocalTeacher(model, k=4)
    changed = copy.deepcopy(data)
    changed[1]["input_ids"][0] = (changed[1]["input_ids"][0] + 1) % VOCAB  # data changed
    examples = list(IndexedDataset(changed))
    order = [0, 5, 1, 6, 3]
    batch_examples = [examples[i] for i in order]
    source = CacheThenLiveTeacher(cache, live, write_back=True)
    batch = TeacherSourceCollator(source)(batch_examples)
    rows = batch["teacher_topk"]
    plain = pad_collate([{"input_ids": changed[i]["input_ids"]} for i in order])
    from_live = live.rows(plain)
    from_cache = cache.lookup(torch.tensor([0, 3]), pad_to=plain["input_ids"].shape[1])
    for key in rows:
        assert torch.equal(rows[key][[0, 4]], from_cache[key]), key   # hits: the cache's
        assert torch.equal(rows[key][[1, 2, 3]], from_live[key][[1, 2, 3]]), key  # misses
    assert (source.hits, source.misses, source.written) == (2, 3, 3)
    # the misses were written back: a second pass needs no teacher and gives the same rows
    again = CacheThenLiveTeacher(cache, NoTeacher())
    second = TeacherSourceCollator(again)(batch_examples)["teacher_topk"]
    for key in rows:
        assert torch.equal(second[key], rows[key]), key
    assert (again.hits, again.misses) == (5, 0)


def test_cached_source_is_the_cache_collator():
    from textbrewer.cache import CachedTeacherCollator
    import tempfile
    model, data = teacher(), dataset()
    with tempfile.TemporaryDirectory() as folder:
        write_teacher_cache(model, data, folder, k=3)
        cache = TeacherCache(folder)
        examples = list(IndexedDataset(data))[1:5]
        ours = TeacherSourceCollator(CachedTeacherSource(cache))(examples)["teacher_topk"]
        theirs = CachedTeacherCollator(cache)(examples)["teacher_topk"]
        for key in ("topk_ids", "topk_logprobs", "tail_mass", "mask"):
            assert torch.equal(ours[key], theirs[key])


def test_a_mixture_with_the_whole_vocabulary_is_the_weighted_average():
    teachers = [teacher(1), teacher(2), teacher(3)]
    batch = pad_collate(dataset())
    mixture = MixtureTeacher([LocalTeacher(t, k=VOCAB) for t in teachers],
                             weights=[1.0, 2.0, 1.0], tail="renormalize")
    rows = mixture.rows(batch, [])
    with torch.no_grad():
        probs = [t(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                 ["logits"].double().softmax(-1) for t in teachers]
    expected = (0.25 * probs[0] + 0.5 * probs[1] + 0.25 * probs[2]).log()
    mask = rows["mask"]
    full = torch.full(expected.shape, float("nan"), dtype=torch.float64)
    full.scatter_(-1, rows["topk_ids"], rows["topk_logprobs"].double())
    torch.testing.assert_close(full[mask], expected[mask], rtol=1e-5, atol=1e-6)
    assert torch.all(rows["tail_mass"][mask] < 1e-6)


def test_a_mixture_of_top_k_rows_by_hand():
    """V = 4, k = 2: teacher A {0: .5, 1: .3} (tail .2), teacher B {1: .6, 2: .2} (tail .2),
    equal weights, tail spread uniformly over the other V − k = 2 ids."""
    class Fixed:
        vocab_size, k = 4, 2

        def __init__(self, ids, probs, tail):
            self.ids, self.probs, self.tail = ids, probs, tail

        def rows(self, batch, examples):
            return {"topk_ids": torch.tensor([[self.ids]]),
                    "topk_logprobs": torch.tensor([[self.probs]]).log(),
                    "tail_mass": torch.tensor([[self.tail]]), "mask": torch.tensor([[True]])}
    batch = {"input_ids": torch.zeros(1, 1, dtype=torch.long)}
    rows = MixtureTeacher([Fixed([0, 1], [0.5, 0.3], 0.2), Fixed([1, 2], [0.6, 0.2], 0.2)]
                          ).rows(batch, [])
    # p(0) = (.5 + .1)/2 = .30, p(1) = (.3 + .6)/2 = .45, p(2) = (.1 + .2)/2 = .15
    assert rows["topk_ids"][0, 0].tolist() == [1, 0]
    torch.testing.assert_close(rows["topk_logprobs"][0, 0].exp(), torch.tensor([0.45, 0.30]))
    torch.testing.assert_close(rows["tail_mass"][0, 0], torch.tensor(0.25))


def test_routing_by_key():
    a, b = LocalTeacher(teacher(1), k=3), LocalTeacher(teacher(2), k=3)
    data = dataset()
    examples = [dict(example, task=task) for example, task
                in zip(data, ["code", "math", "code", "math", "math", "code"])]
    collate = TeacherSourceCollator(RoutedTeacher({"code": a, "math": b}, key="task"),
                                    collate_fn=lambda ex: pad_collate(
                                        [{"input_ids": e["input_ids"]} for e in ex]))
    rows = collate(examples)["teacher_topk"]
    batch = pad_collate([{"input_ids": e["input_ids"]} for e in examples])
    for source, chosen in ((a, [0, 2, 5]), (b, [1, 3, 4])):
        expected = source.rows({k: v[chosen] for k, v in batch.items()})
        for key in rows:
            assert torch.equal(rows[key][chosen], expected[key]), key
    with pytest.raises(ValueError, match=r"example 0 of the batch has task='poetry'; the "
                                         r"sources are \['code', 'math'\]"):
        collate([dict(examples[0], task="poetry")])


# -------------------------------------------------------------- the served source's parsing
TEXTS = ["<s>", " the", " cat", " sat", "\ufffd", "\ufffd", "."]  # ids 4, 5 are ambiguous


def openai_answer(prompt, k):
    """What an OpenAI-style server answers for echo + logprobs (texts as keys)."""
    tops = [None] + [{" the": -0.5, " cat": -1.5, "\ufffd": -2.0} for _ in prompt]
    return {"choices": [{"text": "", "logprobs": {
        "tokens": [TEXTS[i] for i in prompt] + [" the"], "top_logprobs": tops}}]}


def test_served_rows_from_an_openai_style_answer():
    calls = []

    def transport(url, payload, timeout):
        calls.append(payload)
        return openai_answer(payload["prompt"], payload["logprobs"])
    source = ServedTeacher("http://127.0.0.1:1", k=3, token_texts=TEXTS, transport=transport)
    batch = {"input_ids": torch.tensor([[0, 1, 2], [0, 3, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}
    rows = source.rows(batch)
    assert [c["prompt"] for c in calls] == [[0, 1, 2], [0, 3]]
    assert calls[0]["echo"] is True and calls[0]["logprobs"] == 3 and calls[0]["max_tokens"] == 1
    assert rows["mask"].tolist() == [[True, True, True], [True, True, False]]
    # ' the' (id 1), ' cat' (id 2); the ambiguous '\ufffd' joins the tail; a filler id 0
    assert rows["topk_ids"][0, 0].tolist() == [1, 2, 0]
    torch.testing.assert_close(rows["topk_logprobs"][0, 0],
                               torch.tensor([-0.5, -1.5, EMPTY_LOGPROB]))
    expected_tail = 1 - torch.tensor(-0.5).exp() - torch.tensor(-1.5).exp()
    torch.testing.assert_close(rows["tail_mass"][0, 0], expected_tail)


def test_served_rows_from_a_vllm_style_answer():
    def transport(url, payload, timeout):
        entry = {"2": {"logprob": -0.1, "rank": 1}, "6": {"logprob": -3.0, "rank": 2}}
        return {"choices": [{"prompt_logprobs": [None] + [entry] * (len(payload["prompt"]) - 1),
                             "logprobs": {"top_logprobs": [{" cat": -0.2}]}}]}
    source = ServedTeacher("http://x", k=2, token_texts=TEXTS, transport=transport)
    rows = source.rows({"input_ids": torch.tensor([[0, 1]])})
    assert rows["topk_ids"][0].tolist() == [[2, 6], [2, 0]]
    torch.testing.assert_close(rows["topk_logprobs"][0, 1], torch.tensor([-0.2, EMPTY_LOGPROB]))


def test_served_errors_and_retries():
    batch = {"input_ids": torch.tensor([[0, 1]])}
    no_logprobs = ServedTeacher("http://x", k=2, token_texts=TEXTS, transport=lambda *a: {
        "choices": [{"text": "", "logprobs": None}]})
    with pytest.raises(ServedTeacherError, match="returned no log-probabilities.*--logits_all"):
        no_logprobs.rows(batch)

    def other_tokenizer(url, payload, timeout):
        answer = openai_answer(payload["prompt"], 2)
        answer["choices"][0]["logprobs"]["tokens"][1] = " dog"
        return answer
    with pytest.raises(ServedTeacherError, match=r"echoed token ' dog' at position 1 where the "
                                                 r"prompt has ' the' \(id 1\)"):
        ServedTeacher("http://x", k=2, token_texts=TEXTS, transport=other_tokenizer).rows(batch)
    attempts = []

    def flaky(url, payload, timeout):
        attempts.append(1)
        if len(attempts) < 3:
            raise _Retryable("HTTP 503: busy")
        return openai_answer(payload["prompt"], 2)
    ServedTeacher("http://x", k=2, token_texts=TEXTS, retries=2, backoff=0.0,
                  transport=flaky).rows(batch)
    assert len(attempts) == 3
    attempts.clear()
    with pytest.raises(ServedTeacherError, match=r"no answer after 2 attempts: HTTP 503"):
        ServedTeacher("http://x", k=2, token_texts=TEXTS, retries=1, backoff=0.0,
                      transport=flaky).rows(batch)
    with pytest.raises(ServedTeacherError, match=r"http://127.0.0.1:9/v1/completions: no "
                                                 r"answer after 1 attempts"):
        ServedTeacher("http://127.0.0.1:9", k=2, token_texts=TEXTS, retries=0,
                      timeout=2).rows(batch)  # nothing listens on port 9
