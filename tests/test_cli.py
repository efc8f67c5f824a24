"""`textbrewer distill CONFIG.yaml`: config loading and errors, the LM example as config
files (the same perplexities as examples/lm_distillation.py), resume, cache, LoRA, a real
trained tokenizer."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("omegaconf")
pytest.importorskip("transformers")

from textbrewer import cli  # noqa: E402
from textbrewer.job import ConfigError, config_to_yaml, load_job_config  # noqa: E402
from textbrewer.job.build import lr_factor, pack_blocks, load_tokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "examples", "configs")
TEACHER_YAML = os.path.join(CONFIGS, "lm_teacher.yaml")
STUDENT_YAML = os.path.join(CONFIGS, "lm_student.yaml")
TINY_GPT2 = ("{model_type: gpt2, n_embd: 16, n_layer: 1, n_head: 2, vocab_size: 256, "
             "n_positions: 32}")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The LM example's corpus as JSON lines, written by the example itself."""
    folder = tmp_path_factory.mktemp("corpus")
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import lm_distillation
    finally:
        sys.path.pop(0)
    lm_distillation.write_corpus(str(folder))
    return folder


def data_overrides(corpus, blocks=512, eval_blocks=64):
    return [f"data.train={corpus / 'train.jsonl'}",
            f"data.validation={corpus / 'validation.jsonl'}",
            f"data.max_blocks={blocks}", f"data.max_eval_blocks={eval_blocks}"]


def write_yaml(folder, text, name="job.yaml"):
    path = os.path.join(folder, name)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return path


def tiny_job(tmp_path, corpus, extra=""):
    return write_yaml(tmp_path, f"""
student: {{config: {TINY_GPT2}}}
tokenizer: bytes
data: {{train: {corpus / 'train.jsonl'}, validation: {corpus / 'validation.jsonl'},
        sequence_length: 32, max_blocks: 64, max_eval_blocks: 8}}
training: {{steps: 6, batch_size: 8, threads: 1, ckpt_steps: 3}}
output: {{dir: out}}
{extra}""")


def results_of(folder):
    with open(os.path.join(folder, "results.json"), encoding="utf-8") as handle:
        return json.load(handle)


# ------------------------------------------------------------------- config and errors
def test_file_paths_are_read_from_the_file_folder_and_override_paths_from_here(
        tmp_path, corpus, monkeypatch):
    sub = tmp_path / "configs"
    sub.mkdir()
    path = tiny_job(sub, corpus)
    monkeypatch.chdir(tmp_path)
    config = load_job_config(path)
    assert config.output.dir == str(sub / "out")
    config = load_job_config(path, ["output.dir=elsewhere", "training.steps=9"])
    assert config.output.dir == str(tmp_path / "elsewhere")
    assert config.training.steps == 9


def test_an_unknown_key_is_named_with_the_closest_valid_one(tmp_path, corpus):
    path = tiny_job(tmp_path, corpus)
    with pytest.raises(ConfigError, match=r"unknown key 'training.stepz' \(did you mean "
                                          r"'training.steps'\?\).*'batch_size'"):
        load_job_config(path, ["training.stepz=3"])
    bad = tiny_job(tmp_path, corpus, extra="lossy: {divergence: jsd}")
    with pytest.raises(ConfigError, match=r"unknown key 'lossy' \(did you mean 'loss'\?\)"):
        load_job_config(bad)


@pytest.mark.parametrize("override, message", [
    ("training.steps=abc", r"training.steps.*abc"),
    ("training.precision=fp8", r"training.precision='fp8': must be one of \['fp32', 'bf16', "
                               r"'fp16'\]"),
    ("loss.divergence=kl", r"^loss.divergence must be one of \['forward_kl'.*got 'kl'"),
    ("training.schedule=step", r"training.schedule='step': must be one of \['linear', "
                               r"'cosine', 'constant'\]"),
    ("training.steps=0", r"training.steps=0: must be at least 1"),
    ("data.train=nowhere.jsonl", r"data.train=.*nowhere.jsonl.*no such file"),
    ("student.pretrained=/no/folder", r"student: set exactly one of student.pretrained"),
    ("cache.build=true", r"cache.build=true needs cache.path"),
    ("training", r"override 'training': expected key=value"),
])
def test_bad_values_are_errors_that_name_the_key(tmp_path, corpus, override, message):
    with pytest.raises(ConfigError, match=message):
        load_job_config(tiny_job(tmp_path, corpus), [override])


def test_a_divergence_a_cache_cannot_serve_is_named(tmp_path, corpus):
    path = tiny_job(tmp_path, corpus)
    with pytest.raises(ConfigError, match=r"loss.divergence='reverse_kl' with cache.tail="
                                          r"'renormalize': .*infinite.*'bucket'"):
        load_job_config(path, [f"cache.path={tmp_path}", "cache.tail=renormalize",
                               "loss.divergence=reverse_kl"])
    with pytest.raises(ConfigError, match=r"loss.divergence='taid' needs the teacher's full "
                                          r"logits; with cache.path"):
        load_job_config(path, [f"cache.path={tmp_path}", "loss.divergence=taid"])
    config = load_job_config(path, [f"cache.path={tmp_path}", "cache.tail=bucket",
                                    "loss.divergence=reverse_kl"])
    assert config.cache.tail == "bucket"


def test_required_keys_and_the_missing_file_are_named(tmp_path, corpus):
    with pytest.raises(ConfigError, match=r"required keys not set: \['data.train', "
                                          r"'output.dir', 'training.steps'\]"):
        load_job_config(None, [f"student.config={TINY_GPT2}", "tokenizer=bytes"])
    with pytest.raises(ConfigError, match=r"config file .*absent.yaml' does not exist"):
        load_job_config(str(tmp_path / "absent.yaml"))


def test_the_command_exits_2_with_the_message_and_writes_nothing(tmp_path, corpus, capsys):
    path = tiny_job(tmp_path, corpus)
    assert cli.main(["distill", path, "training.stepz=3"]) == 2
    assert "textbrewer distill: error: " in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def test_the_resolved_config_reloads_to_the_same_job(tmp_path, corpus, capsys):
    path = tiny_job(tmp_path, corpus)
    assert cli.main(["config", path, "loss.divergence=jsd", "loss.beta=0.25"]) == 0
    printed = capsys.readouterr().out
    resolved = write_yaml(tmp_path, printed, "resolved.yaml")
    original = load_job_config(path, ["loss.divergence=jsd", "loss.beta=0.25"])
    assert load_job_config(resolved) == original
    assert config_to_yaml(load_job_config(resolved)) == printed


def test_python_dash_m_textbrewer_is_the_command(tmp_path, corpus):
    completed = subprocess.run([sys.executable, "-m", "textbrewer", "config",
                                tiny_job(tmp_path, corpus), "training.steps=7"],
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert "steps: 7" in completed.stdout


def test_the_learning_rate_schedule():
    # 20 steps, warm-up int(0.1 · 20) = 2 steps, then linear from 1 to 0.1
    factors = [lr_factor(step, 20, 0.1, "linear", 0.1) for step in range(20)]
    assert factors[:3] == [0.5, 1.0, 1.0]
    assert factors[-1] == pytest.approx(1.0 - 0.9 * 17 / 18)
    assert lr_factor(11, 20, 0.1, "cosine", 0.0) == pytest.approx(0.5)  # half-way: cos(π/2)
    assert lr_factor(5, 20, 0.1, "constant", 0.1) == 1.0


def test_documents_are_packed_with_the_separator(tmp_path):
    config = load_job_config(None, [f"student.config={TINY_GPT2}", "tokenizer=bytes",
                                    f"data.train={tmp_path}", "training.steps=1",
                                    "output.dir=o"])
    blocks, bytes_per_token = pack_blocks(["ab", "cde"], load_tokenizer(config), 3)
    assert blocks.tolist() == [[97, 98, 0], [99, 100, 101]]  # the last NUL is a partial block
    assert bytes_per_token == 1.0


# -------------------------------------------------------------- the LM example, as files
@pytest.fixture(scope="module")
def example_validation(corpus, tmp_path_factory):
    """examples/lm_distillation.py --quick scored on the validation split (and the cache)."""
    output = tmp_path_factory.mktemp("example")
    completed = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "lm_distillation.py"), "--quick",
         "--split", "validation", "--from-cache", "--output-dir", str(output)],
        capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr
    return results_of(output)["models"]


@pytest.fixture(scope="module")
def cli_runs(corpus, tmp_path_factory):
    """The example's three runs as `textbrewer distill` jobs from the shipped configs."""
    out = tmp_path_factory.mktemp("cli")
    data = data_overrides(corpus)
    assert cli.main(["distill", TEACHER_YAML, *data, "training.steps=20",
                     f"output.dir={out / 'teacher'}"]) == 0
    teacher = f"teacher.pretrained={out / 'teacher' / 'final'}"
    assert cli.main(["distill", STUDENT_YAML, *data, teacher, "training.steps=10",
                     f"output.dir={out / 'student'}"]) == 0
    assert cli.main(["distill", STUDENT_YAML, *data, "teacher=null", "training.steps=10",
                     f"output.dir={out / 'alone'}"]) == 0
    assert cli.main(["distill", STUDENT_YAML, *data, teacher, "training.steps=10",
                     f"cache.path={out / 'cache'}", "cache.build=true", "cache.k=16",
                     f"output.dir={out / 'from_cache'}"]) == 0
    return out


@pytest.mark.parametrize("run, model", [("teacher", "teacher"), ("student", "distilled_student"),
                                        ("alone", "student_alone")])
def test_the_config_files_give_the_example_perplexities(cli_runs, example_validation, run,
                                                        model):
    validation = results_of(cli_runs / run)["validation"]
    assert validation["perplexity"] == pytest.approx(example_validation[model]["perplexity"],
                                                     rel=1e-6)
    # bytes: one token per byte, so both perplexities are the same
    assert validation["perplexity_per_byte"] == pytest.approx(validation["perplexity"])


def test_training_from_a_cache_it_built(cli_runs, example_validation):
    assert os.path.exists(cli_runs / "cache" / "manifest.json")
    validation = results_of(cli_runs / "from_cache")["validation"]
    # the example writes its cache 64 rows per teacher forward, the job 16: float16 rows
    # may round differently, so close, not equal
    assert validation["perplexity"] == pytest.approx(
        example_validation["distilled_from_cache"]["perplexity"], rel=2e-3)
    assert validation["perplexity"] != results_of(cli_runs / "alone")["validation"]["perplexity"]


def test_a_run_writes_its_config_and_reloadable_folders(cli_runs):
    transformers = pytest.importorskip("transformers")
    folder = cli_runs / "student"
    assert sorted(p for p in os.listdir(folder) if not p.startswith(".")) == [
        "config.yaml", "final", "gs10.pkl", "gs10.train_state.pt", "hf", "results.json"]
    model = transformers.AutoModelForCausalLM.from_pretrained(folder / "final")
    state = torch.load(folder / "gs10.pkl", map_location="cpu", weights_only=True)
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    resolved = load_job_config(str(folder / "config.yaml"))
    assert resolved.training.steps == 10 and resolved.teacher is not None


# ------------------------------------------------------------------------------ resume
def test_an_interrupted_run_resumes_to_the_uninterrupted_weights(tmp_path, corpus,
                                                                 monkeypatch):
    path = tiny_job(tmp_path, corpus)
    assert cli.main(["distill", path, f"output.dir={tmp_path / 'whole'}"]) == 0

    from textbrewer.integrations import huggingface

    class Interrupted(Exception):
        pass
    original = huggingface.SavePretrained.__call__

    def stop_after_first_checkpoint(self, model, step, **kwargs):
        original(self, model, step, **kwargs)
        raise Interrupted(step)
    monkeypatch.setattr(huggingface.SavePretrained, "__call__", stop_after_first_checkpoint)
    with pytest.raises(Interrupted):
        cli.main(["distill", path, f"output.dir={tmp_path / 'cut'}"])
    monkeypatch.setattr(huggingface.SavePretrained, "__call__", original)
    assert os.path.exists(tmp_path / "cut" / "gs3.pkl")
    assert not os.path.exists(tmp_path / "cut" / "gs6.pkl")

    # the same folder without --resume: refused, nothing touched
    before = (tmp_path / "cut" / "config.yaml").read_text()
    assert cli.main(["distill", path, f"output.dir={tmp_path / 'cut'}"]) == 2
    # --resume with another config: refused, the differing key named
    with pytest.raises(ConfigError, match=r"training.lr: 0.003 -> 0.001"):
        from textbrewer.job import run_job
        run_job(load_job_config(path, [f"output.dir={tmp_path / 'cut'}", "training.lr=1e-3"]),
                resume=True)
    assert (tmp_path / "cut" / "config.yaml").read_text() == before

    assert cli.main(["distill", path, f"output.dir={tmp_path / 'cut'}", "--resume"]) == 0
    whole = torch.load(tmp_path / "whole" / "gs6.pkl", weights_only=True)
    resumed = torch.load(tmp_path / "cut" / "gs6.pkl", weights_only=True)
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name
    assert results_of(tmp_path / "cut")["validation"] == results_of(tmp_path / "whole")[
        "validation"]


# ------------------------------------------------------------- LoRA, a real tokenizer
def test_a_lora_student_trains_only_its_adapters(tmp_path, corpus):
    pytest.importorskip("peft")
    path = tiny_job(tmp_path, corpus, extra="")
    assert cli.main(["distill", path, "student.lora.r=2", "student.lora.target_modules=[c_attn]",
                     "training.ckpt_steps=null"]) == 0
    results = results_of(tmp_path / "out")
    assert 0 < results["parameters"]["student_trainable"] < results["parameters"]["student"]
    assert "adapter_config.json" in os.listdir(tmp_path / "out" / "final")


def test_a_trained_tokenizer_file_with_a_separator_token(tmp_path, corpus, capsys):
    from textbrewer.testing import train_tokenizer
    with open(corpus / "train.jsonl", encoding="utf-8") as handle:
        texts = [json.loads(line)["text"] for _, line in zip(range(300), handle)]
    tokenizer = train_tokenizer("byte_bpe", texts, 400)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    path = tiny_job(tmp_path, corpus)
    common = [f"tokenizer={tmp_path / 'tokenizer.json'}", "training.ckpt_steps=null"]
    assert cli.main(["distill", path, *common]) == 2
    assert "no EOS token" in capsys.readouterr().err
    assert cli.main(["distill", path, *common, "data.separator_token=</s>"]) == 2
    assert "set student.config.vocab_size >= 400" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")
    assert cli.main(["distill", path, *common, "data.separator_token=</s>",
                     "student.config.vocab_size=400"]) == 0
    results = results_of(tmp_path / "out")
    validation = results["validation"]
    # more than one byte per token: per byte is the smaller perplexity
    assert 1 < validation["perplexity_per_byte"] < validation["perplexity"]
    assert "tokenizer.json" in os.listdir(tmp_path / "out" / "final")


def test_the_shipped_configs_write_under_the_checkout(corpus, tmp_path):
    """Run from the checkout as docs/cli.md says, the shipped files read the corpus from
    and write to ./output_cli (their paths are relative to examples/configs/)."""
    teacher = tmp_path / "final"
    teacher.mkdir()
    config = load_job_config(STUDENT_YAML, data_overrides(corpus)[:2]
                             + [f"teacher.pretrained={teacher}"])
    assert config.output.dir == os.path.join(ROOT, "output_cli", "student")
    shipped_corpus = os.path.join(ROOT, "output_cli", "corpus", "train.jsonl")
    if not os.path.exists(shipped_corpus):  # a clean checkout: the error names the path
        with pytest.raises(ConfigError, match=f"data.train='{shipped_corpus}'"):
            load_job_config(STUDENT_YAML, [f"teacher.pretrained={teacher}"])


def test_plan_prints_every_loss_path_without_building_weights(cli_runs, corpus, capsys):
    overrides = data_overrides(corpus) + [f"teacher.pretrained={cli_runs / 'teacher' / 'final'}"]
    assert cli.main(["plan", STUDENT_YAML, *overrides]) == 0
    printed = capsys.readouterr().out
    assert "micro-batch 16 x 64 tokens" in printed
    header = next(line for line in printed.splitlines() if "dense" in line)
    assert header.split() == ["dense", "chunked", "fused", "cache"]
    from textbrewer.job.plan import job_plans
    plans = job_plans(load_job_config(STUDENT_YAML, overrides))
    import transformers
    trained = transformers.AutoModelForCausalLM.from_pretrained(cli_runs / "student" / "final")
    student = sum(p.numel() for p in trained.parameters())
    for path, plan in plans.items():
        assert plan.student_parameters == 4 * student, path  # float32, counted exactly
    assert plans["cache"].teacher_parameters == 0 < plans["dense"].teacher_parameters
