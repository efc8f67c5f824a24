"""A multi-phase scheme under DDP: two processes (gloo, CPU) of AdversarialDistiller give
the result of one process on the global batch, for the student and the discriminator."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def test_adversarial_two_process_ddp_equals_one_process_over_the_global_batch(tmp_path):
    sys.path.insert(0, HERE)
    try:
        import ddp_worker
    finally:
        sys.path.remove(HERE)
    distributed_dir = tmp_path / "ddp"
    environment = dict(os.environ, OMP_NUM_THREADS="1",
                       PYTHONPATH=os.pathsep.join([os.path.dirname(HERE),
                                                   os.environ.get("PYTHONPATH", "")]))
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        environment.pop(name, None)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node", "2", os.path.join(HERE, "ddp_worker.py"),
                             str(distributed_dir), "adversarial"], env=environment,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    single_dir = tmp_path / "single"
    distiller, student, optimizer = ddp_worker.build_adversarial(str(single_dir))
    loader = torch.utils.data.DataLoader(ddp_worker.dataset(), batch_size=ddp_worker.GLOBAL_BATCH)
    with distiller:
        distiller.train(optimizer, loader, num_epochs=2, max_grad_norm=1.0)

    ranks = [json.loads((distributed_dir / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["wrapped"] == "DistributedDataParallel"
    assert ranks[0]["callbacks"] == [1, 2, 3, 4]
    saved = sorted(name for name in os.listdir(distributed_dir) if name.endswith(".pkl"))
    assert saved == sorted(name for name in os.listdir(single_dir) if name.endswith(".pkl"))
    assert saved
    for name in saved:
        ddp_weights = torch.load(distributed_dir / name, weights_only=True)
        single_weights = torch.load(single_dir / name, weights_only=True)
        for key in single_weights:
            torch.testing.assert_close(ddp_weights[key], single_weights[key], rtol=1e-5,
                                       atol=1e-6, msg=f"{name}: {key}")
    # the discriminator (its own phase, its own DDP wrapper) trained identically too
    for step in (4,):  # the newest training state (older ones are pruned by default)
        state = torch.load(distributed_dir / f"gs{step}.train_state.pt", weights_only=True)
        reference = torch.load(single_dir / f"gs{step}.train_state.pt", weights_only=True)
        (ddp_disc,) = state["phases"]["discriminator"]["modules"]
        (single_disc,) = reference["phases"]["discriminator"]["modules"]
        assert ddp_disc.keys() == single_disc.keys()
        for key in single_disc:
            torch.testing.assert_close(ddp_disc[key], single_disc[key], rtol=1e-5, atol=1e-6,
                                       msg=f"gs{step} discriminator {key}")
    initial = ddp_worker.build_adversarial(str(tmp_path / "fresh"))[0].discriminator.state_dict()
    assert any(not torch.equal(initial[k], single_disc[k]) for k in initial)
