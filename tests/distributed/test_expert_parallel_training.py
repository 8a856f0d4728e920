"""Expert-parallel training end to end under torchrun (gloo): layouts agree with one process, checkpoints
reshard between layouts, and two torchrun launches act as two nodes."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.distributed.reference import FIXED_BATCH, STEPS, assert_same_losses
from parallel.local_ranks import free_port
from tests.integration.pretrain_runs import REPO, failure_report, run_pretrain, run_torchrun, torchrun_command
from train import checkpoint
from train.trainer import read_metrics

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("ep", [2, 4])
def test_four_processes_with_expert_parallelism_match_one_process(tmp_path, data_cache, reference, ep):
    run_dir = tmp_path / f"ep{ep}"
    result = run_torchrun(4, run_dir, data_cache, *FIXED_BATCH, f"parallel.ep={ep}", "checkpoint.every=10")
    assert result.returncode == 0, failure_report(result)
    assert f"dp 4 (ep {ep} x edp {4 // ep})" in result.stdout
    metrics = read_metrics(run_dir)
    assert_same_losses(metrics, reference, range(1, STEPS + 1))
    assert all(m["a2a_dispatch_intra_node_bytes"] > 0 for m in metrics)  # tokens really crossed ranks

    # Resharding: the step-10 checkpoint of this layout resumes under 2 processes (ep 2) and 1 process,
    # and continues with the losses of the uninterrupted run.
    saved = run_dir / "checkpoints" / "step_00000010"
    assert checkpoint.is_complete(saved)
    for nproc, new_ep in ((2, 2), (1, 1)):
        if new_ep == ep and nproc == 4:
            continue
        resumed_dir = tmp_path / f"ep{ep}_to_{nproc}x{new_ep}"
        overrides = (*FIXED_BATCH, f"parallel.ep={new_ep}", f"checkpoint.resume={saved}")
        result = (run_torchrun(nproc, resumed_dir, data_cache, *overrides) if nproc > 1
                  else run_pretrain(resumed_dir, data_cache, *overrides))
        assert result.returncode == 0, failure_report(result)
        assert "resumed from" in result.stdout and "at step 10" in result.stdout
        assert_same_losses(read_metrics(resumed_dir), reference, range(11, STEPS + 1))


def test_two_torchrun_launches_act_as_two_nodes(tmp_path, data_cache, reference):
    """--nnodes=2 with a c10d rendezvous on this machine: ep 4 spans both "nodes" (2 ranks each), the
    hierarchical dispatch crosses nodes, no token reaches more than topk_groups (1) nodes."""
    run_dir = tmp_path / "two_nodes"
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    overrides = (*FIXED_BATCH, "parallel.ep=4", "parallel.dispatch=hierarchical")
    launches = []
    for node in (0, 1):
        args = ("--nnodes=2", f"--node-rank={node}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                "--rdzv-id=two-nodes")
        command = torchrun_command(2, run_dir, data_cache, *overrides, launcher_args=args)
        launches.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=900) for p in launches]
    for p, (out, err) in zip(launches, outputs):
        assert p.returncode == 0, err[-3000:]
    assert "2 per node" in outputs[0][0] + outputs[1][0]
    metrics = read_metrics(run_dir)
    assert_same_losses(metrics, reference, range(1, STEPS + 1))
    assert all(m["a2a_dispatch_inter_node_bytes"] > 0 for m in metrics)  # tokens crossed the "nodes"
    assert max(m["a2a_max_nodes_per_token"] for m in metrics) == 1  # node-limited: topk_groups = 1
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
