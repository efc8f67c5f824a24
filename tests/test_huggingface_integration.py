"""textbrewer.integrations.huggingface: save_pretrained checkpoints that transformers (or
peft) reload alone to the same logits, written atomically; local from_pretrained folders;
LoRA students whose frozen base stays bit-identical; the optimizer check.

Tiny GPT-2 and Llama models built from configs (no download), on the CPU."""
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (AutoModelForCausalLM, AutoTokenizer, GPT2Config,  # noqa: E402
                          GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration)

from textbrewer import CausalLMDistiller, DistillationConfig, TrainingConfig  # noqa: E402
from textbrewer.checkpoint import load_student_weights  # noqa: E402
from textbrewer.integrations import huggingface as hf  # noqa: E402
from textbrewer.integrations.huggingface import (SavePretrained,  # noqa: E402
                                                 check_optimizer_params, load_pretrained,
                                                 lora_student, save_pretrained_atomic,
                                                 trainable_parameters)

VOCAB = 32


def tokenizer():
    words = ["[UNK]", "[PAD]"] + [f"w{i}" for i in range(VOCAB - 2)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]",
                                   pad_token="[PAD]")


def gpt2(seed, width=16, layers=2):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=width, n_layer=layers, n_head=2, vocab_size=VOCAB,
                                      n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0))


def llama(seed):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=2, vocab_size=VOCAB,
                                        max_position_embeddings=32))


IDS = torch.Generator().manual_seed(1)
IDS = torch.randint(2, VOCAB, (16, 12), generator=IDS)


def loader():
    return torch.utils.data.DataLoader([{"input_ids": row} for row in IDS], batch_size=4)


def logits(model, ids=IDS):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def distil(student, teacher, output_dir, optimizer, steps=4, callback=None):
    config = TrainingConfig(device="cpu", output_dir=str(output_dir), ckpt_steps=2, log_dir=None,
                            seed=0)
    distiller = CausalLMDistiller(config, DistillationConfig(hard_label_weight=1.0),
                                  model_T=teacher, model_S=student)
    with distiller:
        distiller.train(optimizer, loader(), num_steps=steps, callback=callback)


# ------------------------------------------------------------------ whole-model checkpoints
@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    teacher, student, tok = gpt2(0, width=24), gpt2(1), tokenizer()
    calls = []
    saver = SavePretrained(root / "hf", tokenizer=tok,
                           callback=lambda model, step: calls.append((model, step)))
    distil(student, teacher, root / "run",
           torch.optim.AdamW(student.parameters(), lr=1e-2), callback=saver)
    saver.save_final(student)
    return root, student, saver, calls


def test_checkpoints_reload_with_transformers_alone_to_the_same_logits(full_run):
    root, student, saver, _ = full_run
    assert sorted(os.listdir(root / "hf")) == ["final", "gs2", "gs4"]  # no temporaries left
    for name in ("gs4", "final"):
        reloaded = AutoModelForCausalLM.from_pretrained(root / "hf" / name,
                                                        local_files_only=True)
        torch.testing.assert_close(logits(reloaded), logits(student), rtol=0, atol=0)
    reloaded_tok = AutoTokenizer.from_pretrained(root / "hf" / "gs4", local_files_only=True)
    assert reloaded_tok("w1 w7 zz")["input_ids"] == [3, 9, 0]


def test_each_checkpoint_folder_holds_that_steps_weights(full_run):
    root, _, _, _ = full_run
    early = AutoModelForCausalLM.from_pretrained(root / "hf" / "gs2", local_files_only=True)
    late = AutoModelForCausalLM.from_pretrained(root / "hf" / "gs4", local_files_only=True)
    pkl = load_student_weights(str(root / "run" / "gs2.pkl"))
    for key, value in early.state_dict().items():
        torch.testing.assert_close(value, pkl[key], rtol=0, atol=0)
    assert not torch.equal(logits(early), logits(late))  # training went on between them


def test_the_user_callback_is_chained_with_the_student_and_step(full_run):
    _, student, _, calls = full_run
    assert [step for _, step in calls] == [2, 4]
    assert all(model is student for model, _ in calls)


def test_wrapped_models_are_unwrapped_before_saving(tmp_path):
    model = gpt2(3)
    wrapped = torch.nn.DataParallel(torch.compile(model))  # compile is lazy: nothing compiles
    assert hf.unwrap_model(wrapped) is model
    path = save_pretrained_atomic(wrapped, tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=0)


def test_a_module_that_is_not_a_pretrained_model_is_refused_by_type(tmp_path):
    with pytest.raises(TypeError, match=r"torch\.nn\.modules\.linear\.Linear"):
        SavePretrained(tmp_path)(model=torch.nn.Linear(2, 2), step=1)
    assert not os.path.exists(tmp_path / "gs1")
    assert os.listdir(tmp_path) == []


def test_a_process_that_is_not_the_main_one_writes_nothing_but_chains(tmp_path):
    calls = []
    saver = SavePretrained(tmp_path, is_main_process=False,
                           callback=lambda model, step: calls.append(step))
    saver(model=gpt2(0), step=3)
    assert calls == [3] and os.listdir(tmp_path) == [] and saver.saved == []


# ------------------------------------------------------------------ atomic writes
def _snapshot(folder):
    return {name: open(os.path.join(folder, name), "rb").read()
            for name in sorted(os.listdir(folder))}


class _FailingTokenizer:
    """Writes a file, then fails: a save that dies half-way."""

    def save_pretrained(self, folder):
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as handle:
            handle.write("{")
        raise OSError("disk full")


def test_a_failed_save_keeps_the_earlier_folder_and_leaves_no_partial_one(tmp_path):
    first = gpt2(0)
    save_pretrained_atomic(first, tmp_path / "gs2")
    before = _snapshot(tmp_path / "gs2")
    with pytest.raises(OSError, match="disk full"):
        save_pretrained_atomic(gpt2(1), tmp_path / "gs2", tokenizer=_FailingTokenizer())
    with pytest.raises(OSError, match="disk full"):
        save_pretrained_atomic(gpt2(1), tmp_path / "gs4", tokenizer=_FailingTokenizer())
    assert sorted(os.listdir(tmp_path)) == ["gs2"]  # no gs4, no temporary folder
    assert _snapshot(tmp_path / "gs2") == before
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "gs2", local_files_only=True)
    torch.testing.assert_close(logits(reloaded), logits(first), rtol=0, atol=0)


def test_a_failure_while_swapping_puts_the_earlier_folder_back(tmp_path, monkeypatch):
    save_pretrained_atomic(gpt2(0), tmp_path / "gs2")
    before = _snapshot(tmp_path / "gs2")
    real_rename, calls = os.rename, []

    def rename(source, target):
        calls.append(target)
        if len(calls) == 2:  # the new folder into place, after the old one was set aside
            raise OSError("rename failed")
        real_rename(source, target)
    monkeypatch.setattr(hf.os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        save_pretrained_atomic(gpt2(1), tmp_path / "gs2")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["gs2"]
    assert _snapshot(tmp_path / "gs2") == before


def test_a_replaced_folder_is_complete_and_leftovers_of_a_killed_save_go(tmp_path):
    save_pretrained_atomic(gpt2(0), tmp_path / "gs2")
    stale = tmp_path / ".tmp-pretrained-gs2-0123456789ab"  # a save killed mid-way
    stale.mkdir()
    (stale / "config.json").write_text("{")
    set_aside = tmp_path / ".old-pretrained-gs6-0123456789ab"  # killed between the renames
    save_pretrained_atomic(gpt2(0), set_aside)
    os.rename(set_aside, tmp_path / ".old-pretrained-gs6-0123456789ab")
    second = gpt2(1)
    save_pretrained_atomic(second, tmp_path / "gs2")
    save_pretrained_atomic(second, tmp_path / "gs6")
    assert sorted(os.listdir(tmp_path)) == ["gs2", "gs6"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "gs2", local_files_only=True)
    torch.testing.assert_close(logits(reloaded), logits(second), rtol=0, atol=0)


# ------------------------------------------------------------------ LoRA students
@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    student = lora_student(llama(5), r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    base_before = {name: p.detach().clone() for name, p in student.named_parameters()
                   if "lora_" not in name}
    lora_before = {name: p.detach().clone() for name, p in student.named_parameters()
                   if "lora_" in name}
    saver = SavePretrained(root / "hf")
    distil(student, llama(6), root / "run",
           torch.optim.AdamW(trainable_parameters(student), lr=1e-2), callback=saver)
    return root, student, base_before, lora_before


def test_only_the_adapters_train_and_the_base_stays_bit_identical(lora_run):
    _, student, base_before, lora_before = lora_run
    named = dict(student.named_parameters())
    assert {n for n, p in named.items() if p.requires_grad} == set(lora_before)
    assert len(lora_before) == 2 * 2 * 2  # A and B, q_proj and v_proj, 2 layers
    for name, value in base_before.items():
        assert torch.equal(named[name].detach(), value), name
    for name, value in lora_before.items():
        assert not torch.equal(named[name].detach(), value), name  # every adapter moved


def test_adapters_are_saved_the_peft_way_and_reload_on_a_fresh_base(lora_run):
    root, student, _, _ = lora_run
    folder = root / "hf" / "gs4"
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(os.listdir(folder))
    assert "model.safetensors" not in os.listdir(folder)  # not the frozen base
    reloaded = peft.PeftModel.from_pretrained(llama(5), folder)  # same init from the config
    torch.testing.assert_close(logits(reloaded), logits(student), rtol=0, atol=0)
    loaded = load_pretrained(folder, base=llama(5)).model
    torch.testing.assert_close(logits(loaded), logits(student), rtol=0, atol=0)
    # and the adapters change the output: the base alone is another model
    assert not torch.allclose(logits(llama(5)), logits(student))


def test_gpt2_conv1d_layers_take_lora_without_warnings(recwarn):
    model = lora_student(gpt2(0), r=2, target_modules=["c_attn"])
    assert not [w for w in recwarn if "fan_in_fan_out" in str(w.message)]
    names = [name for name, _ in trainable_parameters(model, named=True)]
    assert names and all("lora_" in name and "c_attn" in name for name in names)
    torch.testing.assert_close(logits(model), logits(gpt2(0)))  # B = 0: starts as the base


@pytest.mark.parametrize("options, message", [
    (dict(r=0), "r must be"), (dict(alpha=0), "alpha must be"), (dict(dropout=1.0), "dropout")])
def test_lora_options_out_of_range_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        lora_student(gpt2(0), **options)


# ------------------------------------------------------------------ the optimizer check
def test_an_optimizer_holding_the_frozen_base_is_refused_naming_it():
    student = lora_student(llama(0), r=2, target_modules=["q_proj"])
    check_optimizer_params(torch.optim.AdamW(trainable_parameters(student)), student)
    with pytest.raises(ValueError, match=r"frozen parameters \(requires_grad=False\): "
                                         r"base_model\.model\.model\.embed_tokens\.weight"):
        check_optimizer_params(torch.optim.AdamW(student.parameters()), student)
    with pytest.raises(ValueError, match=r"q_proj\.base_layer\.weight"):
        layer = student.base_model.model.model.layers[1].self_attn.q_proj
        check_optimizer_params(torch.optim.SGD([layer.base_layer.weight,
                                                *trainable_parameters(student)], lr=0.1),
                               torch.compile(student))  # named through the wrapper


def test_a_quantised_parameter_is_refused_naming_it():
    model = torch.nn.Linear(3, 2)
    model.register_parameter("packed", torch.nn.Parameter(torch.zeros(4, dtype=torch.int8),
                                                          requires_grad=False))
    assert trainable_parameters(model) == [model.weight, model.bias]
    with pytest.raises(ValueError, match=r"1 quantised parameters: packed \(Parameter, "
                                         r"torch\.int8\)"):
        check_optimizer_params(torch.optim.AdamW(model.parameters()), model)
    stray = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\] \(not the "):
        check_optimizer_params(torch.optim.SGD([{"params": [model.weight]},
                                                {"params": [stray]}], lr=0.1), model)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        check_optimizer_params([model.weight], model)


# ------------------------------------------------------------------ loading local folders
def test_teacher_and_student_round_trip_through_local_folders(tmp_path):
    teacher, student, tok = gpt2(0, width=24, layers=3), gpt2(1), tokenizer()
    teacher.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    student.save_pretrained(tmp_path / "student")
    loaded_teacher, teacher_tok = load_pretrained(tmp_path / "teacher")
    loaded_student, student_tok = load_pretrained(tmp_path / "student")
    assert student_tok is None and teacher_tok("w3")["input_ids"] == [5]
    torch.testing.assert_close(logits(loaded_teacher), logits(teacher), rtol=0, atol=0)
    torch.testing.assert_close(logits(loaded_student), logits(student), rtol=0, atol=0)
    # distil the loaded pair and save the student; transformers alone reads it back
    saver = SavePretrained(tmp_path / "out", tokenizer=teacher_tok)
    distil(loaded_student, loaded_teacher, tmp_path / "run",
           torch.optim.AdamW(loaded_student.parameters(), lr=1e-2), steps=2, callback=saver)
    final = load_pretrained(saver.save_final(loaded_student))
    assert final.tokenizer is not None
    torch.testing.assert_close(logits(final.model), logits(loaded_student), rtol=0, atol=0)
    base = load_pretrained(tmp_path / "student", kind="model", tokenizer=False).model
    assert type(base).__name__ == "GPT2Model"


def test_seq2seq_folders_load_as_seq2seq_models(tmp_path):
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32,
                                                num_layers=1, num_heads=2,
                                                decoder_start_token_id=0))
    model.save_pretrained(tmp_path / "t5")
    loaded = load_pretrained(tmp_path / "t5", kind="seq2seq_lm").model
    assert isinstance(loaded, T5ForConditionalGeneration)
    decoder = IDS[:2, :5]
    model.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS[:2], decoder_input_ids=decoder).logits,
                                   model(input_ids=IDS[:2], decoder_input_ids=decoder).logits,
                                   rtol=0, atol=0)


def test_loading_errors_name_the_folder_and_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'gpt2' is not a local folder"):
        load_pretrained("gpt2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty' has no config\.json.*holds nothing"):
        load_pretrained(tmp_path / "empty")
    gpt2(0).config.save_pretrained(tmp_path / "config_only")
    with pytest.raises(FileNotFoundError, match=r"config_only' has config\.json but no weights "
                                                r"\(one of model\.safetensors"):
        load_pretrained(tmp_path / "config_only")
    with pytest.raises(ValueError, match=r"kind must be one of \['causal_lm', 'model', "
                                         r"'seq2seq_lm'\], got 'causal'"):
        load_pretrained(tmp_path / "config_only", kind="causal")
    lora_student(gpt2(0), r=2).save_pretrained(tmp_path / "adapters")
    with pytest.raises(ValueError, match=r"adapters' holds peft adapters.*pass base="):
        load_pretrained(tmp_path / "adapters")
