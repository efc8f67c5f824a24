"""Cross-tokenizer distillation: alignment of two real tokenisations, the vocabulary map,
the span and ULD losses (equal to same-tokenizer KD when both sides share a tokenizer),
and the causal distiller on batches from two tokenizers."""
import glob
import os
import random

import pytest
import torch

from textbrewer import DistillationConfig, TrainingConfig
from textbrewer.distillers.lm import CausalLMDistiller, LMDistillationConfig
from textbrewer.distillers.lm.cross_tokenizer import (WORD_START, CrossTokenizerCollator,
                                                      Tokenised, align_token_groups, encode,
                                                      token_strings, vocabulary_map,
                                                      _nearest_by_edit_distance)
from textbrewer.losses.token import token_distillation_loss
from textbrewer.losses.token.cross import TokenGroups, cross_tokenizer_loss
from textbrewer.testing import train_tokenizer

pytest.importorskip("tokenizers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = [open(path, encoding="utf-8").read()
          for path in sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
ASCII_TEXTS = ["The teacher distils its knowledge into the student.",
               "def loss(x):\n    return x ** 2  # squared",
               "Temperature 4, weight 0.5; the    student   learns.",
               "Short one."]
HARD_TEXTS = ["Héllo   wörld!\n\n\tThe 😀 distiller's loss_fn(x) = 3.14 —  日本語",
              "  leading spaces, trailing spaces   ",
              "naïve café — coöperate… «quotes» and ‘single’",
              "tabs\tand\nnewlines\r\nand\u00a0no-break spaces"]


@pytest.fixture(scope="module")
def tokenizers():
    return {kind: train_tokenizer(kind, CORPUS, size)
            for kind, size in (("byte_bpe", 500), ("wordpiece", 400), ("unigram", 300))}


def _group_text(text, tokens, positions):
    spans = [tokens.spans[p] for p in positions if not tokens.special[p]]
    if not spans:
        return None
    return "".join(text[min(s for s, _ in spans):max(e for _, e in spans)].split())


# ---------------------------------------------------------------------------------------
# alignment
# ---------------------------------------------------------------------------------------
def test_alignment_of_hand_written_spans():
    text = "hello world, unbelievable"
    teacher = Tokenised([1, 5, 6, 7, 8, 9, 2],
                        [(0, 0), (0, 5), (5, 11), (11, 12), (12, 15), (15, 25), (0, 0)],
                        [True, False, False, False, False, False, True])
    student = Tokenised([3, 10, 11, 12, 13, 14, 15, 4],
                        [(0, 0), (0, 5), (6, 9), (9, 11), (11, 12), (13, 21), (21, 25),
                         (0, 0)],
                        [True, False, False, False, False, False, False, True])
    # ' world' (5, 11) straddles 9, so 'wor' + '##ld' pair with it; ' unbelievable' is
    # cut at 15 on the teacher's side and at 21 on the student's: one group of both
    assert align_token_groups(text, teacher, student) == [
        ([1], [1]), ([2], [2, 3]), ([3], [4]), ([4, 5], [5, 6]), ([6], [7])]


def test_alignment_drops_text_one_side_did_not_reach():
    text = "one two three"
    teacher = Tokenised([5, 6, 7], [(0, 3), (3, 7), (7, 13)], [False] * 3)
    # the student was truncated inside 'three' ('thr' of 'thr' + '##ee')
    student = Tokenised([1, 2, 3, 4], [(0, 3), (4, 7), (8, 11), (8, 8)],
                        [False, False, False, True])
    assert align_token_groups(text, teacher, student) == [([1], [1])]


def test_alignment_pairs_the_same_text_on_real_tokenizers(tokenizers):
    pairs = [("byte_bpe", "wordpiece"), ("byte_bpe", "unigram"), ("wordpiece", "unigram")]
    for name_T, name_S in pairs:
        for text in HARD_TEXTS + ASCII_TEXTS:
            tokens_T = encode(tokenizers[name_T], [text])[0]
            tokens_S = encode(tokenizers[name_S], [text])[0]
            groups = align_token_groups(text, tokens_T, tokens_S)
            assert groups, (name_T, name_S, text)
            seen_T, seen_S = set(), set()
            for group_T, group_S in groups:
                assert group_T == sorted(group_T) and group_S == sorted(group_S)
                assert group_T[0] >= 1 and group_S[0] >= 1
                assert not seen_T & set(group_T) and not seen_S & set(group_S)
                seen_T.update(group_T)
                seen_S.update(group_S)
                special_T = [tokens_T.special[p] for p in group_T]
                special_S = [tokens_S.special[p] for p in group_S]
                if any(special_T) or any(special_S):
                    assert special_T == special_S == [True]
                else:
                    # the same characters, whitespace aside
                    assert _group_text(text, tokens_T, group_T) == \
                        _group_text(text, tokens_S, group_S), (name_T, name_S, text)


def test_truncation_keeps_only_text_both_sides_reached(tokenizers):
    text = HARD_TEXTS[0] + " " + ASCII_TEXTS[0]
    tokens_T = encode(tokenizers["byte_bpe"], [text], max_length=12)[0]
    tokens_S = encode(tokenizers["wordpiece"], [text])[0]
    end_T = max(e for (s, e), special in zip(tokens_T.spans, tokens_T.special) if not special)
    for group_T, group_S in align_token_groups(text, tokens_T, tokens_S):
        assert all(tokens_S.spans[p][1] <= end_T for p in group_S)


def test_special_tokens_pair_by_position(tokenizers):
    text = ASCII_TEXTS[0]
    tokens_T = encode(tokenizers["byte_bpe"], [text])[0]    # <s> ... </s>
    tokens_S = encode(tokenizers["wordpiece"], [text])[0]   # [CLS] ... [SEP]
    groups = align_token_groups(text, tokens_T, tokens_S)
    # BOS sits at position 0 (nothing predicts it); the two EOS close the text together
    assert groups[-1] == ([len(tokens_T.ids) - 1], [len(tokens_S.ids) - 1])
    assert all(not tokens_T.special[g[0][0]] for g in groups[:-1])


def test_spans_outside_the_text_are_an_error():
    tokens = Tokenised([1], [(0, 9)], [False])
    with pytest.raises(ValueError, match=r"span \(0, 9\) outside the text of 3"):
        align_token_groups("abc", tokens, Tokenised([1], [(0, 3)], [False]))


# ---------------------------------------------------------------------------------------
# token strings and the vocabulary map
# ---------------------------------------------------------------------------------------
def test_token_strings_share_one_convention(tokenizers):
    bpe, wordpiece, unigram = (token_strings(tokenizers[k])
                               for k in ("byte_bpe", "wordpiece", "unigram"))
    assert "Ġthe" in tokenizers["byte_bpe"].get_vocab()
    assert bpe[tokenizers["byte_bpe"].token_to_id("Ġthe")] == WORD_START + "the"
    assert wordpiece[tokenizers["wordpiece"].token_to_id("the")] == WORD_START + "the"
    continuation = next(t for t in tokenizers["wordpiece"].get_vocab() if t.startswith("##")
                        and len(t) > 3)
    assert wordpiece[tokenizers["wordpiece"].token_to_id(continuation)] == continuation[2:]
    assert unigram[tokenizers["unigram"].token_to_id("▁the")] == WORD_START + "the"
    assert bpe[1] == "<s>" and wordpiece[3] == "[SEP]"


def _levenshtein(a, b):
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (x != y))
    return row[-1]


def test_nearest_by_edit_distance_matches_a_plain_loop():
    import numpy as np
    rng = random.Random(0)
    candidates = ["".join(rng.choice("abcde") for _ in range(rng.randint(1, 7)))
                  for _ in range(200)]
    lengths = np.array([len(c) for c in candidates])
    codes = np.full((len(candidates), max(lengths)), -1, dtype=np.int64)
    for row, text in enumerate(candidates):
        codes[row, :len(text)] = [ord(c) for c in text]
    for _ in range(50):
        query = "".join(rng.choice("abcdef") for _ in range(rng.randint(1, 8)))
        distances = [_levenshtein(query, c) for c in candidates]
        row, distance = _nearest_by_edit_distance(query, codes, lengths)
        assert distance == min(distances)
        assert row == distances.index(min(distances))  # ties: the first


def test_vocabulary_map(tokenizers):
    bpe, wordpiece = tokenizers["byte_bpe"], tokenizers["wordpiece"]
    strings_T, strings_S = token_strings(bpe), token_strings(wordpiece)
    mapping = vocabulary_map(bpe, wordpiece)
    assert mapping.shape == (bpe.get_vocab_size(),) and mapping.dtype == torch.int64
    exact = 0
    for index, text in strings_T.items():
        if index in (0, 1, 2):  # <pad>, <s>, </s>: no special of that name on the student
            assert mapping[index] == -1
            continue
        target = int(mapping[index])
        if text in strings_S.values():
            assert strings_S[target] == text
            exact += 1
        else:  # MinED: no student token is nearer
            best = min(_levenshtein(text, s) for i, s in strings_S.items() if i > 3)
            assert _levenshtein(text, strings_S[target]) == best
    assert exact > 100
    without = vocabulary_map(bpe, wordpiece, fallback=None, vocab_size_T=520)
    assert without.shape == (520,) and (without[500:] == -1).all()
    assert ((without >= 0) == torch.tensor([strings_T.get(i) in strings_S.values()
                                            and i > 2 for i in range(520)])).all()
    with pytest.raises(ValueError, match="smaller than the teacher's tokenizer"):
        vocabulary_map(bpe, wordpiece, vocab_size_T=10)


# ---------------------------------------------------------------------------------------
# the losses
# ---------------------------------------------------------------------------------------
def _logits(batch, vocab, seed, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    length = batch["input_ids"].shape[1]
    return torch.randn(batch["input_ids"].shape[0], length, vocab, generator=generator,
                       dtype=dtype) * 2


def _shifted(labels):
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)


@pytest.mark.parametrize("divergence,beta,tau", [("forward_kl", 0.5, 1.0),
                                                 ("forward_kl", 0.5, 2.0),
                                                 ("jsd", 0.3, 1.0), ("tv", 0.5, 1.5),
                                                 ("skew_kl", 0.5, 1.0)])
def test_span_mode_with_one_tokenizer_is_token_kd(tokenizers, divergence, beta, tau):
    tokenizer = tokenizers["byte_bpe"]
    batch = CrossTokenizerCollator(tokenizer, tokenizer)(ASCII_TEXTS)
    student = batch["student"]
    vocab = tokenizer.get_vocab_size()
    z_S = _logits(student, vocab, 0).requires_grad_()
    z_T = _logits(student, vocab, 1)
    labels = _shifted(student["labels"])
    # every target token is one group on both sides
    assert batch["token_groups"].batch.shape[0] == int((labels != -100).sum())
    options = dict(divergence=divergence, beta=beta, temperature=tau)
    ours = cross_tokenizer_loss(z_S, z_T, student["input_ids"], batch["teacher"]["input_ids"],
                                batch["token_groups"], mode="span", labels_S=labels,
                                valid_S=labels != -100, ce_weight=0.25, **options)
    (grad_ours,) = torch.autograd.grad(ours, z_S)
    reference = token_distillation_loss(z_S, z_T, labels, ce_weight=0.25, **options)
    (grad_reference,) = torch.autograd.grad(reference, z_S)
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_ours, grad_reference, rtol=1e-10, atol=1e-12)
    # the identity map written out gives the same
    again = cross_tokenizer_loss(z_S, z_T, student["input_ids"], batch["teacher"]["input_ids"],
                                 batch["token_groups"], mode="span", labels_S=labels,
                                 valid_S=labels != -100, ce_weight=0.25,
                                 vocabulary_map=torch.arange(vocab), **options)
    torch.testing.assert_close(again, reference, rtol=1e-12, atol=1e-12)


def test_uld_with_one_tokenizer_is_sorted_l1_token_by_token(tokenizers):
    tokenizer = tokenizers["wordpiece"]
    batch = CrossTokenizerCollator(tokenizer, tokenizer)(ASCII_TEXTS)
    student = batch["student"]
    vocab = tokenizer.get_vocab_size()
    z_S = _logits(student, vocab, 2).requires_grad_()
    z_T = _logits(student, vocab, 3)
    labels = _shifted(student["labels"])
    valid = labels != -100
    ours = cross_tokenizer_loss(z_S, z_T, student["input_ids"], batch["teacher"]["input_ids"],
                                batch["token_groups"], mode="uld", temperature=2.0,
                                valid_S=valid)
    (grad_ours,) = torch.autograd.grad(ours, z_S)
    total = 0.0
    for b, t in valid.nonzero().tolist():
        p = torch.softmax(z_T[b, t] / 2, -1).sort(descending=True).values
        q = torch.softmax(z_S[b, t] / 2, -1).sort(descending=True).values
        total = total + (p - q).abs().sum()
    reference = total / valid.sum()
    (grad_reference,) = torch.autograd.grad(reference, z_S)
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_ours, grad_reference, rtol=1e-10, atol=1e-12)


def test_span_merge_uses_the_chain_of_a_group():
    # teacher: one token 'ab' (id 1) predicted at position 0; student: 'a' (id 2) then
    # 'b' (id 3), predicted at positions 0 and 1
    z_T = torch.tensor([[[0.0, 1.0, -1.0, 0.5], [0.0, 0.0, 0.0, 0.0]]], dtype=torch.float64)
    z_S = torch.tensor([[[0.2, 0.1, 0.7, -0.3], [0.0, 0.4, -0.2, 1.1], [0.0] * 4]],
                       dtype=torch.float64)
    ids_T, ids_S = torch.tensor([[9, 1]]) % 4, torch.tensor([[0, 2, 3]])
    groups = TokenGroups(torch.tensor([0]), torch.tensor([[1]]), torch.tensor([[1, 2]]))
    mapping = torch.tensor([0, 2, 2, 3])  # teacher 'ab' would map to student 'a'
    value = cross_tokenizer_loss(z_S, z_T, ids_S, ids_T, groups, mode="span",
                                 vocabulary_map=mapping)
    p = torch.softmax(z_T[0, 0], -1)
    q0, q1 = torch.softmax(z_S[0, 0], -1), torch.softmax(z_S[0, 1], -1)
    # student merged: entry 2 ('a') becomes P('a')·P('b'|'a'), renormalised
    q = q0.clone()
    q[2] = q0[2] * q1[3]
    q = q / q.sum()
    # teacher: realised 'ab' -> the student's realised 'a' (2); the others through the map
    carried = torch.zeros(4, dtype=torch.float64)
    for v in range(4):
        carried[2 if v == 1 else mapping[v]] += p[v]
    expected = (carried * (carried.log() - q.log())).nansum()
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)


def test_loss_errors():
    z = torch.zeros(1, 3, 5)
    ids = torch.zeros(1, 3, dtype=torch.int64)
    groups = TokenGroups(torch.tensor([0]), torch.tensor([[1]]), torch.tensor([[1]]))
    with pytest.raises(ValueError, match="mode must be one of"):
        cross_tokenizer_loss(z, z, ids, ids, groups, mode="dtw")
    with pytest.raises(ValueError, match="supports the divergences"):
        cross_tokenizer_loss(z, z, ids, ids, groups, divergence="reverse_kl")
    with pytest.raises(ValueError, match="needs vocabulary_map"):
        cross_tokenizer_loss(z, torch.zeros(1, 3, 7), ids, ids, groups)
    with pytest.raises(ValueError, match=r"expected \(7,\)"):
        cross_tokenizer_loss(z, torch.zeros(1, 3, 7), ids, ids, groups,
                             vocabulary_map=torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="outside 1..2"):
        cross_tokenizer_loss(z, z, ids, ids, TokenGroups(torch.tensor([0]),
                                                         torch.tensor([[0]]),
                                                         torch.tensor([[1]])))


def test_one_side_is_that_half_of_the_batch(tokenizers):
    collate = CrossTokenizerCollator(tokenizers["byte_bpe"], tokenizers["wordpiece"],
                                     max_length=20)
    batch = collate(HARD_TEXTS)
    for role in ("teacher", "student"):
        alone = collate.one_side(HARD_TEXTS, role)
        assert alone.keys() == batch[role].keys()
        for key, value in alone.items():
            assert torch.equal(value, batch[role][key]), (role, key)
    with pytest.raises(ValueError, match="role must be 'teacher' or 'student'"):
        collate.one_side(HARD_TEXTS, "assistant")


def test_collator_refuses_different_texts_and_slow_tokenizers(tokenizers):
    collate = CrossTokenizerCollator(tokenizers["byte_bpe"], tokenizers["wordpiece"])
    with pytest.raises(ValueError, match="differ from character 4: 'teacher' vs 'student'"):
        collate([{"teacher": "the teacher", "student": "the student"}])
    with pytest.raises(TypeError, match="needs character offsets"):
        CrossTokenizerCollator(object(), tokenizers["wordpiece"])


# ---------------------------------------------------------------------------------------
# the distiller
# ---------------------------------------------------------------------------------------
def _gpt2(vocab, width, seed):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=128, n_embd=width,
                                     n_layer=1, n_head=2, resid_pdrop=0, embd_pdrop=0,
                                     attn_pdrop=0)
    return transformers.GPT2LMHeadModel(config).eval()


def test_distiller_with_one_tokenizer_equals_token_kd(tokenizers):
    tokenizer = tokenizers["byte_bpe"]
    vocab = tokenizer.get_vocab_size()
    teacher, student = _gpt2(vocab, 32, 0), _gpt2(vocab, 16, 1)
    batch = CrossTokenizerCollator(tokenizer, tokenizer)(ASCII_TEXTS)
    d_config = DistillationConfig(temperature=2.0, hard_label_weight=0.5)
    losses = []
    for lm_config, data in ((LMDistillationConfig(token_alignment="span"), batch),
                            (LMDistillationConfig(path="dense"), batch["student"])):
        distiller = CausalLMDistiller(TrainingConfig(device="cpu"), d_config, teacher,
                                      student, lm_config=lm_config)
        student.zero_grad()
        loss, parts = distiller.train_on_batch(data, {})
        loss.backward()
        losses.append((loss.detach(), parts["unweighted_kd_loss"],
                       [p.grad.clone() for p in student.parameters()]))
    torch.testing.assert_close(losses[0][0], losses[1][0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(losses[0][1], losses[1][1], rtol=1e-6, atol=1e-7)
    for a, b in zip(losses[0][2], losses[1][2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_distiller_learns_across_tokenizers(tokenizers, tmp_path):
    bpe, wordpiece = tokenizers["byte_bpe"], tokenizers["wordpiece"]
    teacher = _gpt2(bpe.get_vocab_size(), 32, 0)
    with torch.no_grad():  # a confident teacher: far from the student's near-uniform start
        teacher.lm_head.weight.mul_(40)
    student = _gpt2(wordpiece.get_vocab_size(), 16, 1).train()
    mapping = vocabulary_map(bpe, wordpiece)
    collate = CrossTokenizerCollator(bpe, wordpiece, max_length=48)
    batch = collate(ASCII_TEXTS + HARD_TEXTS)
    for mode in ("span", "uld"):
        distiller = CausalLMDistiller(
            TrainingConfig(device="cpu", output_dir=str(tmp_path / mode), log_dir=None),
            DistillationConfig(temperature=1.0, hard_label_weight=0.0), teacher,
            copy_of(student), lm_config=LMDistillationConfig(token_alignment=mode),
            vocabulary_map=mapping if mode == "span" else None)
        model = distiller.model_S
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        first = last = None
        for _ in range(40):
            optimizer.zero_grad()
            loss, parts = distiller.train_on_batch(batch, {})
            loss.backward()
            optimizer.step()
            first = float(parts["unweighted_kd_loss"]) if first is None else first
            last = float(parts["unweighted_kd_loss"])
        assert last < 0.6 * first, (mode, first, last)


def copy_of(model):
    import copy
    return copy.deepcopy(model)


def test_distiller_configuration_errors(tokenizers):
    bpe, wordpiece = tokenizers["byte_bpe"], tokenizers["wordpiece"]
    teacher, student = _gpt2(bpe.get_vocab_size(), 16, 0), _gpt2(wordpiece.get_vocab_size(),
                                                                 16, 1)
    config = TrainingConfig(device="cpu")
    d_config = DistillationConfig(temperature=1.0)
    with pytest.raises(ValueError, match="needs vocabulary_map"):
        CausalLMDistiller(config, d_config, teacher, student,
                          lm_config=LMDistillationConfig(token_alignment="span"))
    with pytest.raises(ValueError, match=r"vocabulary_map has 7 entries; the teacher's"):
        CausalLMDistiller(config, d_config, teacher, student,
                          lm_config=LMDistillationConfig(token_alignment="span"),
                          vocabulary_map=torch.zeros(7, dtype=torch.int64))
    with pytest.raises(ValueError, match="supports the divergences"):
        LMDistillationConfig(token_alignment="span", divergence="reverse_kl")
    with pytest.raises(ValueError, match="runs on the dense path"):
        LMDistillationConfig(token_alignment="uld", path="fused")
    with pytest.raises(ValueError, match="on-policy"):
        LMDistillationConfig(token_alignment="uld", lmbda=0.5)
    with pytest.raises(ValueError, match="token_alignment must be one of"):
        LMDistillationConfig(token_alignment="dtw")
    distiller = CausalLMDistiller(config, d_config, teacher, student,
                                  lm_config=LMDistillationConfig(token_alignment="uld"))
    batch = CrossTokenizerCollator(bpe, wordpiece)(ASCII_TEXTS)
    with pytest.raises(ValueError, match="needs batches"):
        distiller.train_on_batch(batch["student"], {})


def test_the_host_sort_equals_torch_sort_in_values_and_gradients():
    from textbrewer.losses.token.cross import _sorted_descending
    generator = torch.Generator().manual_seed(0)
    values = torch.rand(7, 50, generator=generator, dtype=torch.float64)
    values[0, :10] = 0.5  # ties: the same sorted values whichever tied entry goes first
    weights = torch.rand(7, 50, generator=generator, dtype=torch.float64)
    ours = values.clone().requires_grad_(True)
    reference = values.clone().requires_grad_(True)
    sorted_ours = _sorted_descending(ours)
    sorted_reference = reference.sort(dim=1, descending=True).values
    assert torch.equal(sorted_ours, sorted_reference)
    assert torch.equal(_sorted_descending(values), sorted_reference.detach())
    (sorted_ours[1:] * weights[1:]).sum().backward()  # rows without ties: one gradient
    (sorted_reference[1:] * weights[1:]).sum().backward()
    assert torch.equal(ours.grad, reference.grad)
