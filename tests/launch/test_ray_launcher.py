"""The Ray Train launcher with a real local Ray (4 logical CPUs, gloo): 2 workers match the single-process run of
the same global batch; a worker that crashes mid-run is restarted from the last reported checkpoint with every step
reported exactly once and the same losses; clear errors for an unreachable address and for GPUs the cluster lacks."""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch

ray = pytest.importorskip("ray")

from pflow_dist.launch.ray_train import _segment_ends, launch_ray, main  # noqa: E402
from pflow_dist.train import Trainer, load_config  # noqa: E402

pytestmark = pytest.mark.dist

CONFIG = "configs/demo_mqar.yaml"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 6
# tiny model; 2 ranks × 2 sequences = global batch 4; checkpoint (and report) every 2 steps
TINY = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.vocab_size=32", "model.chunk_size=16",
        "data.num_kv_pairs=2", "data.seq_len=16", f"train.steps={STEPS}", "train.ckpt_every=2", "train.eval_every=0",
        "train.eval_batches=1", "train.log_every=0", "train.threads=1", "optim.warmup_steps=2"]


@pytest.fixture(scope="module")
def local_ray():
    # the controller polls workers (and collects their reports) on this interval: faster failure detection
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, object_store_memory=128 * 2**20, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def single_process_losses() -> list[float]:
    """The plain engine in this process, micro batch 4 = the 2-worker global batch."""
    cfg = load_config(os.path.join(ROOT, CONFIG), TINY + ["parallel.engine=plain", "train.micro_batch_size=4",
                                                          "train.progress=false"])
    trainer = Trainer(cfg)
    trainer.train()
    return [r["loss"] for r in trainer.history["train"]]


@pytest.fixture(scope="module")
def two_workers(local_ray, tmp_path_factory) -> dict:
    return launch_ray(os.path.join(ROOT, CONFIG), TINY + ["train.micro_batch_size=2"], num_workers=2,
                      storage_path=tmp_path_factory.mktemp("ray_storage"), name="straight", keep_checkpoints=None)


@pytest.mark.parametrize("start,steps,every,ends", [
    (0, 6, 2, [2, 4, 6]), (0, 7, 3, [3, 6, 7]), (4, 7, 3, [6, 7]), (3, 6, 0, [6]), (6, 6, 2, []), (0, 5, 10, [5]),
], ids=["even", "ragged-tail", "resume-mid-segment", "one-segment", "done", "every-past-end"])
def test_segment_ends(start, steps, every, ends):
    assert _segment_ends(start, steps, every) == ends


def test_two_workers_match_single_process(two_workers, single_process_losses):
    hist = two_workers["history"]
    assert [r["step"] for r in hist] == list(range(1, STEPS + 1))
    assert two_workers["metrics"]["world_size"] == 2 and two_workers["metrics"]["step"] == STEPS
    torch.testing.assert_close(torch.tensor([r["loss"] for r in hist]), torch.tensor(single_process_losses),
                               rtol=1e-5, atol=0)
    assert two_workers["checkpoint"].endswith("checkpoint_step00000006")
    assert os.path.isfile(os.path.join(two_workers["checkpoint"], "latest"))


def test_worker_crash_resumes_from_last_report(local_ray, two_workers, tmp_path):
    marker = tmp_path / "crashed"
    # rank 1 exits after step 3 (mid-segment 3..4) on the first attempt only; ZeRO-2, so each rank's optimizer
    # shard must come back from the merged checkpoint
    out = launch_ray(os.path.join(ROOT, CONFIG), TINY + ["train.micro_batch_size=2", "parallel.zero_stage=2"],
                     num_workers=2, storage_path=tmp_path / "storage", name="crash", keep_checkpoints=None,
                     max_failures=1, fault={"at_step": 3, "rank": 1, "marker": str(marker), "delay_s": 1.5})
    assert marker.read_text().startswith("rank 1 exits after step 3")
    hist = out["history"]
    assert [r["step"] for r in hist] == list(range(1, STEPS + 1)), "every step reported exactly once"
    # Ray merged both workers' folders into one checkpoint: rank 0's model states, each rank's optimizer shard
    files = set(os.listdir(os.path.join(out["checkpoint"], "step00000006")))
    assert {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng_rank0.pt", "rng_rank1.pt"} <= files, files
    # same losses and schedule as the uninterrupted (ZeRO-0) run, bit for bit: an exact resume
    assert [r["loss"] for r in hist] == [r["loss"] for r in two_workers["history"]]
    assert [r["lr"] for r in hist] == [r["lr"] for r in two_workers["history"]]
    assert out["metrics"]["loss"] == two_workers["metrics"]["loss"]
    # the restarted group resumed from the step-2 checkpoint (not from scratch); the others ran straight on
    assert [r["resumed_from_step"] for r in out["reports"]] == [None, 2, None]
    assert [r["resumed_from_step"] for r in two_workers["reports"]] == [None, None, None]


def test_rayjob_entrypoint_flags_parse():
    """k8s/overlays/rayjob/rayjob.yaml runs this module with these flags: they must keep parsing."""
    import shlex

    import yaml

    from pflow_dist.launch.ray_train import parse_args

    with open(os.path.join(ROOT, "k8s/overlays/rayjob/rayjob.yaml")) as f:
        job = next(d for d in yaml.safe_load_all(f) if d and d.get("kind") == "RayJob")
    entry = shlex.split(job["spec"]["entrypoint"])
    assert entry[:3] == ["python", "-m", "pflow_dist.launch.ray_train"]
    a = parse_args(entry[3:] + ["train.steps=10"])
    assert (a.config, a.num_workers, a.use_gpu, a.overrides) == ("/etc/pflow/train.yaml", 16, True, ["train.steps=10"])
    assert a.storage_path == "/checkpoints/ray"


def test_unreachable_address_fails_fast(tmp_path, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    with pytest.raises(ConnectionError, match=f"no Ray cluster answers at '127.0.0.1:{port}'"):
        launch_ray(os.path.join(ROOT, CONFIG), TINY, num_workers=2, address=f"127.0.0.1:{port}", connect_timeout_s=2)
    assert time.perf_counter() - t0 < 10
    with pytest.raises(ValueError, match="host:port"):
        launch_ray(os.path.join(ROOT, CONFIG), TINY, address="ray://:x")
    rc = main(["--config", os.path.join(ROOT, CONFIG), "--num-workers", "2", "--address", f"ray://127.0.0.1:{port}",
               "--connect-timeout", "2", *TINY])
    assert rc == 2 and "no Ray cluster answers" in capsys.readouterr().err


def test_use_gpu_without_gpus(local_ray):
    if ray.cluster_resources().get("GPU", 0) > 0:
        pytest.skip("this cluster has GPUs")
    with pytest.raises(ValueError, match=r"GPU: needs 2, the cluster has 0.*drop --use-gpu"):
        launch_ray(os.path.join(ROOT, CONFIG), TINY + ["train.device=auto"], num_workers=2, use_gpu=True)
    with pytest.raises(ValueError, match="use_gpu=True but train.device='cpu'"):
        launch_ray(os.path.join(ROOT, CONFIG), TINY, num_workers=2, use_gpu=True)


def test_two_workers_sequence_parallel_match_single_process(local_ray, single_process_losses, tmp_path):
    """parallel.sp_size=2 through the Ray path: the two workers hold halves of the same 4 sequences (data-parallel
    degree 1, so the global batch is unchanged) and the loss curve is the one-process curve up to summation order."""
    out = launch_ray(os.path.join(ROOT, CONFIG), TINY + ["train.micro_batch_size=4", "parallel.sp_size=2"],
                     num_workers=2, storage_path=tmp_path / "storage", name="sp", keep_checkpoints=None)
    hist = out["history"]
    assert [r["step"] for r in hist] == list(range(1, STEPS + 1))
    torch.testing.assert_close(torch.tensor([r["loss"] for r in hist]), torch.tensor(single_process_losses),
                               rtol=1e-4, atol=0)
