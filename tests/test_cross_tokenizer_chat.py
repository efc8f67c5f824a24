"""Cross-tokenizer chats: each side renders the messages with its own chat template, only
the messages' contents are aligned, and train_on='assistant' picks the assistant's
tokens and the end of its turn. Real tokenizers trained offline; two real template
formats (ChatML for the teacher, Llama-2's [INST] for the student)."""
import glob
import os

import pytest
import torch

pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("jinja2")

from textbrewer import DistillationConfig, TrainingConfig  # noqa: E402
from textbrewer.distillers.lm import CausalLMDistiller, LMDistillationConfig  # noqa: E402
from textbrewer.distillers.lm.cross_tokenizer import (CrossTokenizerCollator,  # noqa: E402
                                                      encode, render_chat, vocabulary_map)
from textbrewer.testing import train_tokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = [open(path, encoding="utf-8").read()
          for path in sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}")
LLAMA2 = ("<s>{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} "
          "[/INST]{% else %} {{ m['content'] }} </s>{% endif %}{% endfor %}")
CHATS = [
    [{"role": "user", "content": "What does the teacher give the student?"},
     {"role": "assistant", "content": "Its softened logits, at temperature 4."}],
    [{"role": "user", "content": "Naïve question: is KD — really — useful?"},
     {"role": "assistant", "content": "Yes: the student keeps most of the quality."},
     {"role": "user", "content": "Thanks!"},
     {"role": "assistant", "content": "You are welcome."}],
]


@pytest.fixture(scope="module")
def chat_tokenizers():
    teacher = transformers.PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer("byte_bpe", CORPUS, 500), pad_token="<pad>",
        eos_token="</s>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    teacher.chat_template = CHATML
    student = transformers.PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer("sentencepiece_bpe", CORPUS, 400), pad_token="<pad>",
        bos_token="<s>", eos_token="</s>", additional_special_tokens=["[INST]", "[/INST]"])
    student.chat_template = LLAMA2
    return teacher, student


def _characters(text, tokens, positions):
    """The text a group's tokens cover (byte tokens of one character share its span)."""
    spans = [tokens.spans[p] for p in positions]
    return text[min(a for a, _ in spans):max(b for _, b in spans)].strip()


def test_each_side_renders_its_own_template_and_finds_every_message(chat_tokenizers):
    teacher, student = chat_tokenizers
    text_T, places_T = render_chat(teacher, CHATS[1], "teacher")
    text_S, places_S = render_chat(student, CHATS[1], "student")
    assert text_T.startswith("<|im_start|>user\nNaïve question")
    assert text_S.startswith("<s>[INST] Naïve question")
    for (role_T, a, b), (role_S, c, d), message in zip(places_T, places_S, CHATS[1]):
        assert role_T == role_S == message["role"]
        assert text_T[a:b] == text_S[c:d] == message["content"]


def test_groups_pair_the_same_message_text_and_never_template_tokens(chat_tokenizers):
    teacher, student = chat_tokenizers
    batch = CrossTokenizerCollator(teacher, student)(
        [{"messages": chat} for chat in CHATS])
    groups = batch["token_groups"]
    template_T = set(teacher.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]))
    template_S = set(student.convert_tokens_to_ids(["[INST]", "[/INST]", "<s>", "</s>"]))
    paired = {0: [], 1: []}
    for row in range(len(CHATS)):
        text_T, _ = render_chat(teacher, CHATS[row], "teacher")
        text_S, _ = render_chat(student, CHATS[row], "student")
        tokens_T = encode(teacher, [text_T], add_special_tokens=False)[0]
        tokens_S = encode(student, [text_S], add_special_tokens=False)[0]
        assert batch["teacher"]["input_ids"][row, :len(tokens_T.ids)].tolist() == tokens_T.ids
        for g in (groups.batch == row).nonzero().flatten().tolist():
            t = [p for p in groups.teacher[g].tolist() if p >= 0]
            s = [p for p in groups.student[g].tolist() if p >= 0]
            assert not {tokens_T.ids[p] for p in t} & template_T
            assert not {tokens_S.ids[p] for p in s} & template_S
            assert _characters(text_T, tokens_T, t) == _characters(text_S, tokens_S, s)
            paired[row].append(_characters(text_S, tokens_S, s))
    # most of every message's text is paired (a token straddling a message's edge is not)
    for row, chat in enumerate(CHATS):
        content = "".join("".join(m["content"].split()) for m in chat)
        joined = "".join("".join(piece.split()) for piece in paired[row])
        assert len(joined) >= 0.8 * len(content), (row, joined)


def test_one_tokenizer_and_one_template_pair_every_content_token_one_to_one(chat_tokenizers):
    teacher, _ = chat_tokenizers
    batch = CrossTokenizerCollator(teacher, teacher)([{"messages": CHATS[0]}])
    groups = batch["token_groups"]
    assert torch.equal(groups.teacher, groups.student)
    assert groups.teacher.shape[1] == 1
    text, places = render_chat(teacher, CHATS[0], "teacher")
    tokens = encode(teacher, [text], add_special_tokens=False)[0]
    inside = [p for p, ((a, b), special) in enumerate(zip(tokens.spans, tokens.special))
              if not special and b > a and any(s <= a and b <= e for _, s, e in places)]
    assert groups.teacher[:, 0].tolist() == inside


def test_train_on_assistant_targets_its_tokens_and_the_end_of_its_turns(chat_tokenizers):
    teacher, student = chat_tokenizers
    collate = CrossTokenizerCollator(teacher, student, train_on="assistant")
    batch = collate([{"messages": CHATS[1]}])
    text, places = render_chat(student, CHATS[1], "student")
    tokens = encode(student, [text], add_special_tokens=False)[0]
    labels = batch["student"]["labels"][0].tolist()
    targets = [p for p, label in enumerate(labels) if label != -100]
    eos = student.convert_tokens_to_ids("</s>")
    expected = []
    for role, start, end in places:
        if role == "assistant":
            # every token with characters of the content (here: '▁Y' holds the space too)
            expected += [p for p, ((a, b), special) in enumerate(zip(tokens.spans,
                                                                      tokens.special))
                         if not special and b > a and a < end and b > start]
            expected.append(next(p for p in range(expected[-1] + 1, len(tokens.ids))
                                 if tokens.ids[p] == eos))
    assert targets == sorted(expected)
    assert [tokens.ids[p] for p in targets].count(eos) == 2  # one per assistant turn
    assert collate.one_side([{"messages": CHATS[1]}], "student")["labels"].tolist() == [labels]


def test_chat_errors(chat_tokenizers):
    teacher, student = chat_tokenizers
    plain = transformers.PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer("byte_bpe", CORPUS, 300), eos_token="</s>")
    with pytest.raises(ValueError, match="the student's tokenizer .* has no chat_template"):
        CrossTokenizerCollator(teacher, plain)([{"messages": CHATS[0]}])
    shouting = transformers.PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer("byte_bpe", CORPUS, 300), eos_token="</s>")
    shouting.chat_template = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
    with pytest.raises(ValueError, match=r"the teacher's chat template does not reproduce "
                                         r"message 0 \('user'"):
        CrossTokenizerCollator(shouting, student)([{"messages": CHATS[0]}])
    with pytest.raises(ValueError, match="mixes chat examples"):
        CrossTokenizerCollator(teacher, student)([{"messages": CHATS[0]}, "plain text"])
    with pytest.raises(ValueError, match="train_on='assistant' needs chat examples"):
        CrossTokenizerCollator(teacher, student, train_on="assistant")(["plain text"])
    with pytest.raises(ValueError, match="train_on must be 'all' or 'assistant'"):
        CrossTokenizerCollator(teacher, student, train_on="user")


def test_the_distiller_trains_on_chats_across_templates(chat_tokenizers, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    teacher_tokenizer, student_tokenizer = chat_tokenizers

    def gpt2(vocab, seed):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=256, n_embd=16,
                                          n_layer=1, n_head=2, bos_token_id=None,
                                          eos_token_id=None))
    teacher = gpt2(len(teacher_tokenizer), 0)
    student = gpt2(len(student_tokenizer), 1)
    collate = CrossTokenizerCollator(teacher_tokenizer, student_tokenizer, train_on="assistant")
    batch = collate([{"messages": chat} for chat in CHATS])
    distiller = CausalLMDistiller(
        TrainingConfig(device="cpu", output_dir=str(tmp_path), log_dir=None),
        DistillationConfig(temperature=1.0, hard_label_weight=0.0),
        model_T=teacher, model_S=student,
        lm_config=LMDistillationConfig(token_alignment="span"),
        vocabulary_map=vocabulary_map(teacher_tokenizer, student_tokenizer))
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    with distiller:
        distiller.train(optimizer, [batch] * 6, num_steps=6)
    # the student moved towards the teacher on the paired positions
    with torch.no_grad():
        from textbrewer.losses.token.cross import cross_tokenizer_loss
        groups = batch["token_groups"]
        start = gpt2(len(student_tokenizer), 1)
        kd = [cross_tokenizer_loss(model(**{k: v for k, v in batch["student"].items()
                                            if k != "labels"}).logits,
                                   teacher(**batch["teacher"]).logits,
                                   batch["student"]["input_ids"],
                                   batch["teacher"]["input_ids"], groups,
                                   vocabulary_map=vocabulary_map(teacher_tokenizer,
                                                                 student_tokenizer))
              for model in (start, student)]
    assert kd[1] < kd[0]
