"""textbrewer.cache: offline teacher top-k outputs (writer, memory-mapped reader, CLI)."""
import json
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from textbrewer.cache import (CachedTeacherCollator, IndexedDataset, TeacherCache,
                              example_hash, id_dtype_for_vocab, pad_collate,
                              teacher_fingerprint, write_teacher_cache)
from textbrewer.cache import writer as writer_module
from textbrewer.testing import TinyTransformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V, K = 60, 5


def make_teacher(vocab=V, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(vocab, 16), nn.Linear(16, vocab))


def make_data(count=13, vocab=V, seed=1, max_length=9, masks=False, labels=False):
    generator = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(count):
        length = int(torch.randint(1, max_length, (), generator=generator))
        example = {"input_ids": torch.randint(0, vocab, (length,), generator=generator)}
        if masks:
            # Left padding inside the example: its first positions are not real tokens.
            pad = int(torch.randint(0, length, (), generator=generator))
            example["attention_mask"] = torch.cat([torch.zeros(pad), torch.ones(length - pad)]
                                                  ).long()
        if labels:
            example["labels"] = example["input_ids"].clone()
            example["labels"][:length // 2] = -100  # a masked prompt
        data.append(example)
    return data


@pytest.fixture
def built(tmp_path):
    teacher, data = make_teacher(), make_data()
    path = str(tmp_path / "cache")
    manifest = write_teacher_cache(teacher, data, path, K, batch_size=4, shard_tokens=20)
    return teacher, data, path, manifest


def reference_rows(teacher, data, batch_size, k, rule="attention_mask"):
    """Per example (positions, ids, fp16 log-probs, float64 tail) from the same batches."""
    rows = []
    for start in range(0, len(data), batch_size):
        examples = data[start:start + batch_size]
        batch = pad_collate(examples)
        with torch.no_grad():
            out = teacher(batch["input_ids"]) if isinstance(teacher, nn.Sequential) else \
                teacher(input_ids=batch["input_ids"],
                        attention_mask=batch["attention_mask"])["logits"]
        logprobs = out.float().log_softmax(-1)
        for row, example in enumerate(examples):
            length = len(example["input_ids"])
            valid = batch["attention_mask"][row, :length].bool()
            if rule == "shifted_labels":
                following = torch.cat([batch["labels"][row, 1:length] != -100,
                                       torch.tensor([False])])
                valid &= following
            positions = torch.nonzero(valid).flatten()
            top = logprobs[row, positions].topk(k, dim=-1)
            probs64 = logprobs[row, positions].double().exp()
            tail = 1 - probs64.gather(-1, top.indices).sum(-1)
            rows.append((positions, top.indices, top.values.half(), tail))
    return rows


# -- format ----------------------------------------------------------------------------------

def test_id_dtype_is_the_smallest_that_holds_every_id():
    assert id_dtype_for_vocab(256) == np.uint8 and id_dtype_for_vocab(257) == np.uint16
    assert id_dtype_for_vocab(32768) == np.uint16  # int16 would overflow at id 32,767 + 1
    assert id_dtype_for_vocab(65536) == np.uint16 and id_dtype_for_vocab(65537) == np.int32
    assert id_dtype_for_vocab(128256) == np.int32
    with pytest.raises(ValueError):
        id_dtype_for_vocab(0)


def test_exact_round_trip_of_ids_and_fp16_logprobs(built):
    teacher, data, path, manifest = built
    assert len(manifest.shards) > 1  # shard_tokens=20 splits 13 examples
    cache = TeacherCache(path, verify="checksum")
    assert len(cache) == len(data) and cache.k == K and cache.vocab_size == V
    for index, (positions, ids, logprobs, tail) in enumerate(reference_rows(teacher, data, 4, K)):
        out = cache.lookup([index])
        assert torch.equal(out["mask"][0], torch.ones(len(data[index]["input_ids"]),
                                                      dtype=torch.bool))
        assert out["topk_ids"].dtype == torch.int64
        assert torch.equal(out["topk_ids"][0, positions], ids)
        # fp16 as written: the float32 result is the fp16 value, exactly
        assert torch.equal(out["topk_logprobs"][0, positions], logprobs.float())
        # tail mass by formula: 1 - sum of the top-k probabilities
        torch.testing.assert_close(out["tail_mass"][0, positions].double(), tail,
                                   rtol=1e-5, atol=1e-7)


def test_tail_mass_is_zero_when_k_is_the_vocabulary(tmp_path):
    teacher, data = make_teacher(vocab=8), make_data(4, vocab=8)
    write_teacher_cache(teacher, data, tmp_path, 8)
    out = TeacherCache(str(tmp_path)).lookup(range(4))
    assert torch.all(out["tail_mass"] == 0)
    probs = out["topk_logprobs"].exp().sum(-1)[out["mask"]]
    torch.testing.assert_close(probs, torch.ones_like(probs), atol=5e-3, rtol=0)


def test_manifest_records_the_format(built):
    teacher, data, path, manifest = built
    with open(os.path.join(path, "manifest.json"), encoding="utf-8") as handle:
        raw = json.load(handle)
    assert raw["format_version"] == 1 and raw["k"] == K and raw["vocab_size"] == V
    assert raw["temperature"] == 1.0 and raw["positions"] == "attention_mask"
    assert raw["dtypes"] == {"ids": "uint8", "logprobs": "float16", "tail_mass": "float32"}
    assert raw["num_examples"] == len(data)
    assert raw["num_tokens"] == sum(len(example["input_ids"]) for example in data)
    assert raw["teacher"]["fingerprint"] == teacher_fingerprint(teacher)
    offsets = np.load(os.path.join(path, "index.row_offsets.npy"))
    assert offsets.tolist() == np.cumsum([0] + [len(e["input_ids"]) for e in data]).tolist()
    hashes = np.load(os.path.join(path, "index.example_hashes.npy"))
    assert hashes.tolist() == [example_hash(example["input_ids"]) for example in data]
    for shard in raw["shards"]:
        assert set(shard["files"]) == {"ids", "logprobs", "tail_mass", "valid"}
        for entry in shard["files"].values():
            assert os.path.getsize(os.path.join(path, entry["name"])) == entry["bytes"]
            assert len(entry["sha256"]) == 64


def test_bytes_per_token_is_the_formula_plus_stated_overhead(built):
    _, data, path, manifest = built
    cache = TeacherCache(path)
    header = 128  # a .npy v1 header, padded to 64 bytes: 128 for these shapes
    tokens = manifest.num_tokens
    expected = tokens * (K * (1 + 2) + 4)  # rows: k·(id bytes + fp16) + float32 tail
    expected += sum((shard.positions + 7) // 8 for shard in manifest.shards)  # valid bits
    expected += 4 * header * len(manifest.shards)
    expected += (len(data) + 1) * 8 * 2 + len(data) * 8 + 3 * header  # index files
    total = sum(os.path.getsize(os.path.join(path, name)) for name in os.listdir(path)
                if name != "manifest.json")
    assert total == expected == manifest.data_bytes
    assert cache.bytes_per_token == pytest.approx(expected / tokens)
    assert manifest.row_bytes == K * 3 + 4


# -- alignment ---------------------------------------------------------------------------

@pytest.mark.parametrize("rule", ["attention_mask", "shifted_labels"])
def test_alignment_with_padding_masks_and_labels(tmp_path, rule):
    torch.manual_seed(0)
    teacher = TinyTransformer(vocab_size=V, num_labels=V, token_level=True, max_length=12)
    data = make_data(11, masks=True, labels=True, max_length=12)
    write_teacher_cache(teacher, data, tmp_path, K, batch_size=3, positions=rule,
                        shard_tokens=7)
    cache = TeacherCache(str(tmp_path))
    reference = reference_rows(teacher, data, 3, K, rule)
    assert cache.num_tokens == sum(len(positions) for positions, *_ in reference)
    out = cache.lookup(range(len(data)))
    for index, (positions, ids, logprobs, _) in enumerate(reference):
        expected_mask = torch.zeros(out["mask"].shape[1], dtype=torch.bool)
        expected_mask[positions] = True
        assert torch.equal(out["mask"][index], expected_mask)
        assert torch.equal(out["topk_ids"][index, positions], ids)
        assert torch.equal(out["topk_logprobs"][index, positions], logprobs.float())
        # positions without a row hold a harmless one-hot: id 0, log-prob 0, tail 0
        assert torch.all(out["topk_logprobs"][index, ~expected_mask] == 0)
        assert torch.all(out["tail_mass"][index, ~expected_mask] == 0)


def test_padding_does_not_change_the_teacher_outputs(tmp_path):
    # Batched (padded) and one-by-one writes agree: masks reach the teacher.
    torch.manual_seed(0)
    teacher = TinyTransformer(vocab_size=V, num_labels=V, token_level=True, max_length=12)
    data = make_data(6, max_length=12)
    write_teacher_cache(teacher, data, tmp_path / "a", K, batch_size=6)
    write_teacher_cache(teacher, data, tmp_path / "b", K, batch_size=1)
    a = TeacherCache(str(tmp_path / "a")).lookup(range(6))
    b = TeacherCache(str(tmp_path / "b")).lookup(range(6))
    assert torch.equal(a["mask"], b["mask"])
    torch.testing.assert_close(a["topk_logprobs"], b["topk_logprobs"], atol=2e-3, rtol=0)


def test_shuffled_lookup_order(built):
    _, data, path, _ = built
    cache = TeacherCache(path)
    order = [7, 2, 9, 0, 12]
    together = cache.lookup(torch.tensor(order), pad_to=10)
    for row, index in enumerate(order):
        alone = cache.lookup([index], pad_to=10)
        for key in together:
            assert torch.equal(together[key][row], alone[key][0]), (key, index)
    batch = pad_collate([data[index] for index in order])
    checked = cache.lookup(order, input_ids=batch["input_ids"])
    assert checked["topk_ids"].shape == (5, batch["input_ids"].shape[1], K)
    with pytest.raises(ValueError, match="shorter than example"):
        cache.lookup(order, pad_to=1)
    with pytest.raises(IndexError, match="out of range"):
        cache.lookup([len(data)])


# -- refusals ------------------------------------------------------------------------------

def test_stale_cache_names_the_example(built):
    _, data, path, _ = built
    cache = TeacherCache(path)
    changed = [dict(example) for example in data]
    changed[3] = {"input_ids": (changed[3]["input_ids"] + 1) % V}
    order = [5, 3]
    batch = pad_collate([changed[index] for index in order])
    with pytest.raises(ValueError, match=r"example 3 \(batch row 1\).*do not match"):
        cache.lookup(order, input_ids=batch["input_ids"])
    with pytest.raises(ValueError, match=r"first: \[3\]"):
        cache.check_matches(changed)
    with pytest.raises(ValueError, match="the dataset has 12 examples, the cache 13"):
        cache.check_matches(data[:-1])
    cache.check_matches(data)


def test_a_different_vocab_size_is_refused(built):
    path = built[2]
    with pytest.raises(ValueError, match=f"vocab_size={V}.*expected_vocab_size={V + 4}"):
        TeacherCache(path, expected_vocab_size=V + 4)
    TeacherCache(path, expected_vocab_size=V)


def test_a_crash_before_the_manifest_leaves_no_cache(tmp_path, monkeypatch):
    real = writer_module._write_file

    def crash_on_manifest(folder, name, write):
        if name == "manifest.json":
            raise KeyboardInterrupt("killed")
        return real(folder, name, write)

    monkeypatch.setattr(writer_module, "_write_file", crash_on_manifest)
    path = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        write_teacher_cache(make_teacher(), make_data(), path, K)
    assert any(name.startswith("shard-") for name in os.listdir(path))
    with pytest.raises(FileNotFoundError, match=r"manifest\.json: missing.*incomplete"):
        TeacherCache(str(path))
    monkeypatch.undo()
    with pytest.raises(FileExistsError, match="incomplete teacher cache"):
        write_teacher_cache(make_teacher(), make_data(), path, K)
    write_teacher_cache(make_teacher(), make_data(), path, K, overwrite=True)
    TeacherCache(str(path), verify="checksum")


def test_a_truncated_shard_is_refused(built):
    path, manifest = built[2], built[3]
    name = manifest.shards[1].files["logprobs"].name
    with open(os.path.join(path, name), "r+b") as handle:
        handle.truncate(manifest.shards[1].files["logprobs"].bytes - 6)
    with pytest.raises(ValueError, match=rf"{name}: \d+ bytes, the manifest says"):
        TeacherCache(path)


def test_a_corrupted_shard_fails_its_checksum(built):
    path, manifest = built[2], built[3]
    name = manifest.shards[0].files["ids"].name
    with open(os.path.join(path, name), "r+b") as handle:
        handle.seek(-1, os.SEEK_END)
        last = handle.read(1)
        handle.seek(-1, os.SEEK_END)
        handle.write(bytes([last[0] ^ 1]))
    TeacherCache(path)  # sizes only by default: checksums are lazy
    with pytest.raises(ValueError, match=rf"sha256 differs.*{name}"):
        TeacherCache(path, verify="checksum")
    with pytest.raises(ValueError, match="sha256 differs"):
        TeacherCache(path).verify()


def test_leftover_files_are_refused(built):
    path = built[2]
    open(os.path.join(path, "shard-00099.ids.npy.tmp"), "wb").close()
    with pytest.raises(ValueError, match=r"does not list.*shard-00099\.ids\.npy\.tmp"):
        TeacherCache(path)


def test_missing_folder_and_bad_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such teacher-cache folder"):
        TeacherCache(str(tmp_path / "nowhere"))
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(ValueError, match="not a teacher-cache manifest"):
        TeacherCache(str(tmp_path))


def test_a_non_empty_output_dir_needs_overwrite(tmp_path, built):
    teacher, data, path, _ = built
    with pytest.raises(FileExistsError, match="holds a teacher cache.*overwrite=True"):
        write_teacher_cache(teacher, data, path, K)
    write_teacher_cache(teacher, data[:4], path, K, overwrite=True)
    assert len(TeacherCache(path)) == 4  # the old shards are gone (no leftovers)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="only replaces a teacher cache.*notes.txt"):
        write_teacher_cache(teacher, data, foreign, K, overwrite=True)
    assert (foreign / "notes.txt").exists()


def test_bad_arguments(tmp_path):
    teacher = make_teacher()
    with pytest.raises(ValueError, match="larger than the teacher's vocab_size"):
        write_teacher_cache(teacher, make_data(), tmp_path / "a", V + 1)
    with pytest.raises(ValueError, match="empty"):
        write_teacher_cache(teacher, [], tmp_path / "b", K)
    with pytest.raises(ValueError, match="needs 'labels'"):
        write_teacher_cache(teacher, make_data(), tmp_path / "c", K, positions="labels")
    with pytest.raises(ValueError, match="positions must be one of"):
        write_teacher_cache(teacher, make_data(), tmp_path / "d", K, positions="mask")

    def left_pad(examples):
        batch = pad_collate(examples)
        batch["input_ids"] = batch["input_ids"].flip(1)
        return batch

    with pytest.raises(ValueError, match="must pad on the right"):
        write_teacher_cache(teacher, make_data(), tmp_path / "e", K, collate_fn=left_pad)


def test_teacher_fingerprint(built):
    teacher, _, path, _ = built
    cache = TeacherCache(path)
    cache.check_teacher(teacher)
    other = make_teacher(seed=1)
    assert teacher_fingerprint(other, "structure") == teacher_fingerprint(teacher, "structure")
    with pytest.raises(ValueError, match="not the teacher that wrote the cache"):
        cache.check_teacher(other)


# -- training against the cache ------------------------------------------------------------

def test_collator_gives_each_shuffled_example_its_rows(built):
    _, data, path, _ = built
    cache = pickle.loads(pickle.dumps(TeacherCache(path)))  # as in DataLoader workers
    loader = torch.utils.data.DataLoader(
        IndexedDataset(data), batch_size=4, shuffle=True,
        generator=torch.Generator().manual_seed(0), collate_fn=CachedTeacherCollator(cache))
    seen = []
    for batch in loader:
        rows = batch.pop("teacher_topk")
        assert set(batch) == {"input_ids", "attention_mask"}
        indices = rows["example_index"].tolist()
        seen += indices
        expected = cache.lookup(indices, pad_to=batch["input_ids"].shape[1])
        for key in ("topk_ids", "topk_logprobs", "tail_mass", "mask"):
            assert torch.equal(rows[key], expected[key])
        assert torch.equal(rows["mask"], batch["attention_mask"].bool())
    assert sorted(seen) == list(range(len(data))) and seen != sorted(seen)


def test_a_student_learns_from_the_cache_without_the_teacher(built):
    _, data, path, _ = built
    loader = torch.utils.data.DataLoader(IndexedDataset(data), batch_size=4, shuffle=True,
                                         collate_fn=CachedTeacherCollator(TeacherCache(path)))
    student = make_teacher(seed=3)
    optimizer = torch.optim.Adam(student.parameters(), lr=0.05)

    def epoch_loss():
        total = 0.0
        for batch in loader:
            rows = batch.pop("teacher_topk")
            logq = F.log_softmax(student(batch["input_ids"]), dim=-1)
            # top-k renormalised: forward KL over the k cached ids, per valid token
            logp = rows["topk_logprobs"].log_softmax(-1)
            per_token = (logp.exp() * (logp - logq.gather(-1, rows["topk_ids"]))).sum(-1)
            mask = rows["mask"].float()
            loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
        return total

    first = epoch_loss()
    for _ in range(10):
        last = epoch_loss()
    assert last < 0.5 * first


# -- command line ----------------------------------------------------------------------------

def _cli(args, pythonpath, cwd):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([pythonpath, ROOT]))
    return subprocess.run([sys.executable, "-m", "textbrewer.cache", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


FACTORY = textwrap.dedent("""
    import torch
    from torch import nn

    def make():
        torch.manual_seed(0)
        teacher = nn.Sequential(nn.Embedding(70, 8), nn.Linear(8, 70))
        data = [{"input_ids": torch.arange(i % 5 + 2) * 7 % 70} for i in range(10)]
        return teacher, data

    def broken():
        return 42
""")


def test_cli_build_and_info(tmp_path):
    # Subprocesses for the real command (each pays `import textbrewer`, seconds).
    factory = tmp_path / "factories" / "my_teacher.py"
    factory.parent.mkdir()
    factory.write_text(FACTORY)
    output = tmp_path / "cache"
    done = _cli(["build", "--factory", "my_teacher:make", "--output", str(output), "--k", "4",
                 "--batch-size", "3", "--shard-tokens", "10"], str(factory.parent), tmp_path)
    assert done.returncode == 0, done.stderr
    assert "examples      10" in done.stdout
    cache = TeacherCache(str(output), verify="checksum")
    assert cache.k == 4 and cache.vocab_size == 70 and len(cache.manifest.shards) > 1

    info = _cli(["info", str(output)], str(factory.parent), tmp_path)
    assert info.returncode == 0, info.stderr
    assert f"bytes/token   {cache.bytes_per_token:.2f}" in info.stdout
    assert "verification  OK: sha256" in info.stdout

    bad = _cli(["build", "--factory", "my_teacher:broken", "--output", str(tmp_path / "x"),
                "--k", "4"], str(factory.parent), tmp_path)
    assert bad.returncode == 2 and "returned int" in bad.stderr, bad.stderr


def test_cli_errors_and_exit_codes(tmp_path, monkeypatch, capsys):
    # The same main() in-process, for the error paths.
    from textbrewer.cache.__main__ import main
    (tmp_path / "my_teacher_cli.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    output = str(tmp_path / "cache")
    assert main(["build", "--factory", "my_teacher_cli:make", "--output", output,
                 "--k", "4"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["info", output, "--verify", "size", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.split("verification")[0])["k"] == 4

    assert main(["build", "--factory", "my_teacher_cli:make", "--output", output,
                 "--k", "4"]) == 1
    assert "overwrite" in capsys.readouterr().err
    with open(os.path.join(output, "shard-00000.tail_mass.npy"), "r+b") as handle:
        handle.seek(-1, os.SEEK_END)
        handle.write(b"\x7f")
    assert main(["info", output, "--verify", "size"]) == 0
    assert main(["info", output]) == 1
    assert "sha256 differs" in capsys.readouterr().err
    os.remove(os.path.join(output, "manifest.json"))
    assert main(["info", output]) == 1
    assert "manifest.json: missing" in capsys.readouterr().err

    for spec, message in (("nowhere_module:make", "cannot import 'nowhere_module'"),
                          ("my_teacher_cli", "expected 'package.module:function'"),
                          ("my_teacher_cli:nothing", "has no callable 'nothing'")):
        assert main(["build", "--factory", spec, "--output", str(tmp_path / "x"),
                     "--k", "4"]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["build", "--output", str(tmp_path / "x")])
    assert exited.value.code == 2 and "--factory" in capsys.readouterr().err


def test_importing_the_cache_does_not_import_transformers():
    code = "import sys, textbrewer.cache; print('transformers' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


# -- a Hugging Face causal LM, when transformers is installed --------------------------------

def test_transformers_gpt2_with_shifted_labels(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=300, n_positions=16, n_embd=16, n_layer=1,
                                     n_head=2, bos_token_id=0, eos_token_id=0)
    teacher = transformers.GPT2LMHeadModel(config).eval()  # the reference without dropout
    data = make_data(5, vocab=300, max_length=12, labels=True)
    write_teacher_cache(teacher, data, tmp_path, K, batch_size=2, positions="shifted_labels")
    cache = TeacherCache(str(tmp_path), expected_vocab_size=300)
    assert cache.manifest.dtypes["ids"] == "uint16"
    for index, example in enumerate(data):
        with torch.no_grad():
            logits = teacher(input_ids=example["input_ids"][None]).logits[0]
        out = cache.lookup([index])
        positions = torch.nonzero(out["mask"][0]).flatten()
        expected = [t for t in range(len(example["input_ids"]) - 1)
                    if example["labels"][t + 1] != -100]
        assert positions.tolist() == expected
        top = logits.log_softmax(-1)[positions].topk(K)
        assert torch.equal(out["topk_ids"][0, positions], top.indices)
        torch.testing.assert_close(out["topk_logprobs"][0, positions], top.values,
                                   atol=2e-2, rtol=0)
