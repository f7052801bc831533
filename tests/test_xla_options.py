"""XLA compiler options of the train step: the backend's defaults, `xla_options` over them, bad ones refused early."""

import collections
import re

import pytest

from neox_jax.config import TrainConfig, apply_overrides
from neox_jax.errors import ConfigError
from neox_jax.xla_options import GPU_DEFAULTS, compiler_options
from tests.test_train import trainer


def test_gpu_defaults_are_options_this_jaxlib_takes_and_overrides_apply():
    assert compiler_options({}, "gpu") == GPU_DEFAULTS  # each tried on a compile: a renamed option fails here
    assert compiler_options({}, "cpu") == {}
    options = compiler_options({"xla_gpu_enable_latency_hiding_scheduler": None,
                                "xla_gpu_all_gather_combine_threshold_bytes": 1 << 20}, "gpu")
    assert "xla_gpu_enable_latency_hiding_scheduler" not in options
    assert options["xla_gpu_all_gather_combine_threshold_bytes"] == 1 << 20
    assert len(options) == len(GPU_DEFAULTS) - 1


@pytest.mark.parametrize("bad, message", [
    ({"xla_gpu_no_such_option": True}, "No such compile option: 'xla_gpu_no_such_option'"),
    ({"xla_gpu_enable_latency_hiding_scheduler": "yes"}, "'yes' is not a valid bool value"),
])
def test_an_option_xla_refuses_is_a_config_error_before_the_step_compiles(bad, message):
    with pytest.raises(ConfigError, match=f"xla_options .*{re.escape(message)}.*correct or remove it in `xla_options`"):
        trainer({"data": 1}, xla_options=bad)


def test_xla_options_must_be_a_mapping_and_come_from_yaml_overrides():
    with pytest.raises(ConfigError, match="xla_options=\\['fast'\\]: expected a mapping of XLA option names"):
        TrainConfig(xla_options=["fast"])
    cfg = apply_overrides(TrainConfig(), ["xla_options={xla_gpu_enable_latency_hiding_scheduler: false}"])
    assert cfg.xla_options == {"xla_gpu_enable_latency_hiding_scheduler": False}


def test_the_options_reach_the_compiled_step():
    """XLA's CPU `fusion` pass disabled through `xla_options`: the step compiles into another program (elementwise
    ops left in fusions of their own), so the options are the step's, not a trivial program's alone."""
    kinds = []
    for options in ({}, {"xla_disable_hlo_passes": "fusion"}):
        tr = trainer({"data": 1}, xla_options=options)
        state = tr.abstract_state_with_shardings()
        hlo = tr.step.lower(state, tr.abstract_batch()).compile().as_text()
        kinds.append(collections.Counter(re.findall(r"kind=(k\w+)", hlo)))
    assert tr.compiler_options == {"xla_disable_hlo_passes": "fusion"}
    assert kinds[1]["kLoop"] > kinds[0]["kLoop"]
