"""CausalLMDistiller under torchrun with 2 processes (gloo, CPU) equals one process on the
global batch: the token loss is normalised by the valid tokens of the whole accumulation
window summed over the ranks, with very different lengths on the two ranks."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")
HERE = os.path.dirname(os.path.abspath(__file__))

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _worker():
    sys.path.insert(0, HERE)
    try:
        import ddp_worker
    finally:
        sys.path.remove(HERE)
    return ddp_worker


def _torchrun(output_dir, mode):
    environment = dict(os.environ, OMP_NUM_THREADS="1",
                       PYTHONPATH=os.pathsep.join([os.path.dirname(HERE),
                                                   os.environ.get("PYTHONPATH", "")]))
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        environment.pop(name, None)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node", "2", os.path.join(HERE, "ddp_worker.py"),
                             str(output_dir), mode], env=environment, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _single_process(ddp_worker, output_dir):
    """The same run in this process: one process, the whole global batch at once."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        distiller, student, optimizer = ddp_worker.build_lm(str(output_dir))
        loader = torch.utils.data.DataLoader(ddp_worker.lm_dataset(),
                                             batch_size=ddp_worker.GLOBAL_BATCH,
                                             collate_fn=ddp_worker.lm_collate)
        with distiller:
            distiller.train(optimizer, loader, num_epochs=2, max_grad_norm=1.0)
    finally:
        torch.set_num_threads(threads)
    return student


def test_two_process_lm_distillation_equals_one_process_over_the_global_batch(tmp_path):
    ddp_worker = _worker()
    distributed_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    _torchrun(distributed_dir, "lm")
    _single_process(ddp_worker, single_dir)
    ranks = [json.loads((distributed_dir / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["wrapped"] == "DistributedDataParallel"
    saved = sorted(name for name in os.listdir(distributed_dir) if name.endswith(".pkl"))
    assert saved == sorted(name for name in os.listdir(single_dir) if name.endswith(".pkl"))
    assert len(saved) == 4
    for name in saved:
        ddp_weights = torch.load(distributed_dir / name, weights_only=True)
        single_weights = torch.load(single_dir / name, weights_only=True)
        for key in single_weights:
            torch.testing.assert_close(ddp_weights[key], single_weights[key], rtol=1e-5,
                                       atol=1e-6, msg=f"{name}: {key}")


def _has_fsdp2():
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


needs_fsdp2 = pytest.mark.skipif(not _has_fsdp2(),
                                 reason="FSDP2 (torch.distributed.fsdp.fully_shard) is not "
                                        "available")


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory):
    """The uninterrupted 2-process FSDP2 run's folder."""
    folder = tmp_path_factory.mktemp("fsdp2")
    _torchrun(folder, "lm-fsdp2")
    return folder


@needs_fsdp2
def test_fsdp2_sharded_teacher_and_student_equal_one_process(tmp_path, fsdp2_run):
    """FSDP2 on both models, fused path: the gathered student equals the one-process run,
    and so does every gs{N}.pkl (written unsharded: the runtime skips DDP for a sharded
    student and gathers its state dict for checkpoints)."""
    ddp_worker = _worker()
    (tmp_path / "fsdp2").symlink_to(fsdp2_run, target_is_directory=True)
    student = _single_process(ddp_worker, tmp_path / "single")
    full = torch.load(tmp_path / "fsdp2" / "fsdp2_full.pt", weights_only=True)
    reference = student.state_dict()
    assert sorted(full) == sorted(reference)
    for key, value in reference.items():
        torch.testing.assert_close(full[key], value, rtol=1e-5, atol=1e-6, msg=key)
    saved = sorted(p.name for p in (tmp_path / "fsdp2").glob("gs*.pkl"))
    assert saved == sorted(p.name for p in (tmp_path / "single").glob("gs*.pkl")) and saved
    for name in saved:
        sharded_run = torch.load(tmp_path / "fsdp2" / name, weights_only=True)
        single_run = torch.load(tmp_path / "single" / name, weights_only=True)
        for key, value in single_run.items():
            assert type(sharded_run[key]) is torch.Tensor  # not a DTensor shard
            torch.testing.assert_close(sharded_run[key], value, rtol=1e-5, atol=1e-6,
                                       msg=f"{name}: {key}")
    # the training state holds the gathered optimizer state (momentum of every element)
    state = torch.load(tmp_path / "fsdp2" / f"{saved[-1][:-4]}.train_state.pt",
                       weights_only=True)
    reference_state = torch.load(tmp_path / "single" / f"{saved[-1][:-4]}.train_state.pt",
                                 weights_only=True)
    assert len(state["optimizer"]["state"]) == len(reference_state["optimizer"]["state"])


@needs_fsdp2
def test_fsdp2_save_pretrained_folders_hold_the_gathered_student(fsdp2_run):
    """SavePretrained under FSDP2: every process gathers the shards, rank 0 writes; each
    hf/gs{N} folder reloads with transformers alone to the weights of gs{N}.pkl."""
    transformers = pytest.importorskip("transformers")
    steps = sorted(p.name[2:-4] for p in fsdp2_run.glob("gs*.pkl"))
    assert sorted(p.name for p in (fsdp2_run / "hf").iterdir()) == sorted(
        f"gs{step}" for step in steps)
    for step in steps:
        model = transformers.AutoModelForCausalLM.from_pretrained(fsdp2_run / "hf" / f"gs{step}")
        weights = torch.load(fsdp2_run / f"gs{step}.pkl", weights_only=True)
        for key, value in model.state_dict().items():
            assert type(value) is torch.Tensor
            assert torch.equal(value, weights[key]), f"gs{step}: {key}"


@needs_fsdp2
def test_fsdp2_resume_equals_the_uninterrupted_run(tmp_path, fsdp2_run):
    """Stopped after checkpoint 1 (mid-epoch) and resumed with resume_from='latest' by two
    new processes: the gathered student and every later checkpoint equal the uninterrupted
    FSDP2 run's, bit for bit (same processes, same shards, same order of operations)."""
    _torchrun(tmp_path, "lm-fsdp2-cut")
    assert sorted(p.name for p in tmp_path.glob("gs*")) == ["gs1.pkl", "gs1.train_state.pt"]
    assert not (tmp_path / "fsdp2_full.pt").exists()
    _torchrun(tmp_path, "lm-fsdp2-resume")
    resumed = torch.load(tmp_path / "fsdp2_full.pt", weights_only=True)
    reference = torch.load(fsdp2_run / "fsdp2_full.pt", weights_only=True)
    assert sorted(resumed) == sorted(reference)
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key
    for name in ("gs2.pkl", "gs3.pkl", "gs4.pkl"):
        ours = torch.load(tmp_path / name, weights_only=True)
        theirs = torch.load(fsdp2_run / name, weights_only=True)
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), name
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["callbacks"] for r in ranks] == [[2, 3, 4], [2, 3, 4]]
