"""Stage sizing: every job's stages fit the cluster it finds, or it fails at once naming the keys."""

from __future__ import annotations

import pytest

from tests.conftest import ROOT
from vtplatform import resources as R
from vtplatform.config import ConfigError, load_config
from vtplatform.stages import lstm, tsn

CONFIGS = ROOT / "configs"


def cpus(n: float, per_node: float | None = None) -> R.Cluster:
    return R.Cluster(cpus=n, gpus=0, node_cpus=per_node or n, node_gpus=0)


def fits(plan: R.PipelineSizes, cluster: R.Cluster) -> bool:
    """One actor of every model stage, one data task and the writer run at once."""
    actors = sum(m.num_cpus for m in plan.models.values())
    return actors + plan.task_cpus + plan.writer_cpus <= cluster.cpus + 1e-9 and all(
        m.num_cpus <= cluster.node_cpus for m in plan.models.values()
    )


@pytest.mark.parametrize("n", [1, 2, 3, 16])
@pytest.mark.parametrize("job", ["extract", "tag", "lstm_inference"])
def test_shipped_configs_fit_any_cpu_only_cluster(job, n):
    config = load_config(CONFIGS / ("tag.yaml" if job == "tag" else "tsn.yaml"))
    needs = {
        "extract": [tsn.need(config)],
        "tag": [tsn.need(config), lstm.tag_need(config)],
        "lstm_inference": [lstm.inference_need(config)],
    }[job]
    cluster = cpus(n)
    plan = R.pipeline_sizes(config, cluster, needs, R.device(config, cluster))
    assert plan.device == "cpu" and fits(plan, cluster), plan
    assert plan.writer_cpus == 0  # the writer never waits for a CPU
    assert all(m.min_actors == 1 and m.threads >= 1 for m in plan.models.values())
    if n >= 2 * len(needs) + 1:  # room enough: the config's own sizes are kept
        assert [m.num_cpus for m in plan.models.values()] == [x.cpus for x in needs]
        assert plan.task_cpus == config.resources.decode_cpus


def test_tag_on_two_cpus_leaves_room_to_decode():
    """The hang users hit: TSN and AttentionLSTM actors at 1 CPU each took both CPUs."""
    config = load_config(CONFIGS / "tag.yaml")
    cluster = cpus(2)
    plan = R.pipeline_sizes(config, cluster, [tsn.need(config), lstm.tag_need(config)], "cpu")
    tsn_actor, lstm_actor = plan.models["TSN"], plan.models["AttentionLSTM"]
    assert tsn_actor.num_cpus + lstm_actor.num_cpus == pytest.approx(1.0)
    assert tsn_actor.num_cpus == pytest.approx(0.5) and lstm_actor.num_cpus == pytest.approx(0.5)  # lstm = tsn cpus
    assert plan.task_cpus == pytest.approx(1.0)


def test_more_cpu_actors_only_where_cpus_allow():
    config = load_config(CONFIGS / "tsn.yaml", ["resources.tsn_actors=8", "resources.tsn_cpus=2"])
    small, big = cpus(4), cpus(64, per_node=16)
    assert R.pipeline_sizes(config, small, [tsn.need(config)], "cpu").models["TSN"].max_actors == 1
    assert R.pipeline_sizes(config, big, [tsn.need(config)], "cpu").models["TSN"].max_actors == 8


@pytest.mark.parametrize("n", [1, 2])
def test_training_fits_with_the_seed_configs(n):
    for name in ("attention_lstm.yaml", "attention_lstm-single.yaml", "tsn.yaml", "tsn-single.yaml"):
        config = load_config(CONFIGS / name)
        plan = R.training_sizes(config, cpus(n))
        assert not plan.use_gpu and plan.workers == config.train.num_gpus
        assert plan.workers * plan.cpus_per_worker + plan.task_cpus <= n + 1e-9, (name, plan)
        assert plan.threads >= 1 and plan.task_cpus > 0


def test_gpu_requests_a_cluster_cannot_meet_fail_at_once_naming_the_keys():
    config = load_config(CONFIGS / "tsn.yaml", ["resources.use_gpu=true"])
    with pytest.raises(ConfigError, match=r"resources\.use_gpu=true.*no GPUs.*resources\.use_gpu=auto or false"):
        R.device(config, cpus(2))
    one_gpu = R.Cluster(cpus=8, gpus=1, node_cpus=8, node_gpus=1)
    with pytest.raises(ConfigError, match=r"8 GPU training workers.*resources\.train_workers to at most 1"):
        R.training_sizes(config, one_gpu)  # tsn.yaml: TRAIN.num_gpus 8
    two = load_config(CONFIGS / "tsn.yaml", ["resources.use_gpu=true", "resources.tsn_gpus=2"])
    with pytest.raises(ConfigError, match=r"resources\.tsn_gpus=2.*no node"):
        R.pipeline_sizes(two, one_gpu, [tsn.need(two)], "gpu")
    with pytest.raises(ConfigError, match=r"no CPUs.*resources\.wait_for_resources_s"):
        R.pipeline_sizes(config, R.Cluster(0, 0, 0, 0), [tsn.need(config)], "cpu")
    with pytest.raises(ConfigError, match=r"resources\.train_cpus=2 x 1 workers"):
        R.training_sizes(load_config(CONFIGS / "tsn-single.yaml", ["resources.train_cpus=2"]), cpus(2))


def test_gpu_actors_share_one_gpu_instead_of_waiting_for_a_second():
    """TSN (1 GPU) and the tagger's AttentionLSTM (0.25 GPU) on a 1-GPU machine."""
    config = load_config(CONFIGS / "tag.yaml")
    cluster = R.Cluster(cpus=8, gpus=1, node_cpus=8, node_gpus=1)
    plan = R.pipeline_sizes(config, cluster, [tsn.need(config), lstm.tag_need(config)], R.device(config, cluster))
    gpus = [m.num_gpus for m in plan.models.values()]
    assert plan.device == "gpu" and sum(gpus) <= 1.0 and all(g > 0 for g in gpus)
    assert plan.models["TSN"].max_actors == config.resources.tsn_actors  # an autoscaler may add GPUs later


def test_waiting_for_resources_gives_up_after_the_configured_time(ray_cluster):
    import time

    config = load_config(CONFIGS / "tsn.yaml", ["resources.use_gpu=true", "resources.wait_for_resources_s=2"])
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"no GPUs.*waited resources\.wait_for_resources_s=2"):
        R.size_pipeline(config, [tsn.need(config)])
    assert 2 <= time.monotonic() - start < 15
