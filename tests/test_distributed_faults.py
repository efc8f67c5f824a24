"""DDP behaviours a 0.2.1 script or a fault meets: unused student parameters, a NaN on one
process, a callback that synchronises the processes (2 gloo processes under torchrun)."""
import os
import subprocess
import sys

import pytest
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _run(tmp_path, mode):
    output_dir = tmp_path / mode
    output_dir.mkdir()
    environment = dict(os.environ, OMP_NUM_THREADS="1", TEXTBREWER_VERBOSITY="error",
                       PYTHONPATH=os.pathsep.join([os.path.dirname(HERE),
                                                   os.environ.get("PYTHONPATH", "")]))
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        environment.pop(name, None)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node", "2", os.path.join(HERE, "ddp_faults_worker.py"),
                             mode, str(output_dir)], env=environment, capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return [(output_dir / f"rank{rank}.txt").read_text() for rank in range(2)]


@pytest.mark.parametrize("mode", ["unused", "barrier"])
def test_trains_like_textbrewer_021(tmp_path, mode):
    # a parameter without gradient (0.2.1 used find_unused_parameters=True), and a callback
    # that runs on every process and synchronises them (0.2.1 ran it on every process)
    assert _run(tmp_path, mode) == ["finished callbacks=[2, 4]"] * 2


def test_a_nan_on_one_process_stops_every_process_with_a_message(tmp_path):
    rank0, rank1 = _run(tmp_path, "nan")
    assert rank1.startswith("NonFiniteLossError: loss term 'unweighted_kd_loss' is nan at "
                            "micro-batch 1")
    assert rank0.startswith("NonFiniteLossError: a loss term became NaN or infinite on another "
                            "process")


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or not sys.platform.startswith("linux"),
                    reason="reads thread names from Linux's /proc/self/task")
def test_the_workers_thread_check_sees_a_running_gloo_thread_and_not_a_joined_one():
    # the workers' check after train(): a thread that keeps running is reported; one that
    # was joined is not (its /proc entry may outlive the join by microseconds)
    import ctypes
    import threading
    sys.path.insert(0, HERE)
    try:
        from ddp_worker import gloo_threads_left
    finally:
        sys.path.remove(HERE)
    libc = ctypes.CDLL(None, use_errno=True)
    named, release = threading.Event(), threading.Event()

    def pretend_gloo_thread():
        libc.prctl(15, b"gloo_test_loop", 0, 0, 0)  # 15 = PR_SET_NAME: this thread's comm
        named.set()
        release.wait(30)

    thread = threading.Thread(target=pretend_gloo_thread)
    thread.start()
    try:
        assert named.wait(30)
        assert gloo_threads_left(grace_s=0.2) == ["gloo_test_loop"]
    finally:
        release.set()
        thread.join()
    assert gloo_threads_left(grace_s=5.0) == []
