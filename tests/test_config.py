"""Config loading is strict and typed: unknown keys name the closest valid one, wrong types name
the dotted path, dotted overrides go through the same checks, recipes validate."""

from __future__ import annotations

from pathlib import Path

import pytest

from megavlm.config import ConfigError, RunConfig, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "launch" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_recipes_load(path):
    run = load_config(path)
    if run.stages[0].init.path is not None:  # paper-1b: imported text model, image stage continues it
        assert len(run.stages) == 2 and run.stages[0].schedule.kind == "continue"
        assert run.stages[0].schedule.source is not None and run.stages[1].init.stage == run.stages[0].name
        return
    assert isinstance(run, RunConfig) and len(run.stages) == 3
    names = [s.name for s in run.stages]
    assert run.stages[1].init.stage == names[0] and run.stages[1].schedule.kind == "continue"


def test_unknown_key_names_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'model.hiden_size'; did you mean 'hidden_size'"):
        load_config(raw={"model": {"hiden_size": 64}})
    with pytest.raises(ConfigError, match=r"'stages.0.schedul'.*'schedule'"):
        load_config(raw={"stages": [{"name": "a", "tokens": 10, "schedul": {}}]})


def test_wrong_type_names_path():
    with pytest.raises(ConfigError, match=r"model.num_layers: expected an integer, got 'four'"):
        load_config(raw={"model": {"num_layers": "four"}})
    with pytest.raises(ConfigError, match=r"parallel.sequence_parallel: expected true/false"):
        load_config(raw={"parallel": {"sequence_parallel": "yes"}})
    with pytest.raises(ConfigError, match=r"stages.0.schedule.kind: 'linear' is not one of"):
        load_config(raw={"stages": [{"name": "a", "tokens": 10, "schedule": {"kind": "linear"}}]})


def test_dotted_overrides(tmp_path):
    path = CONFIGS[[p.name for p in CONFIGS].index("tiny.yaml")]
    run = load_config(path, ["stages.1.tokens=1e6", "parallel.tp=2", "run_dir=/x", "stages.image.save_every=3"])
    assert run.stages[1].tokens == 1_000_000 and run.parallel.tp == 2 and run.run_dir == "/x"
    assert run.stage("image").save_every == 3 and run.stage("text").save_every == 0  # by name, that stage only
    run = load_config(path, ["stages.image.mixture.captions=0.2", "stages.image.mixture.text=0.8"])
    assert run.stage("image").mixture.captions == 0.2
    with pytest.raises(ConfigError, match="unknown config key 'stages.1.tokenz'"):
        load_config(path, ["stages.1.tokenz=5"])
    with pytest.raises(ConfigError, match="index 7 out of range"):
        load_config(path, ["stages.7.tokens=5"])
    with pytest.raises(ConfigError, match="must look like key.path=value"):
        load_config(path, ["stages.1.tokens"])


def test_one_name_for_training_everything():
    raw = lambda t: {"stages": [{"name": "a", "tokens": 1, "trainable": t}]}  # noqa: E731
    assert load_config(raw=raw("all")).stages[0].trainable == "all"
    with pytest.warns(DeprecationWarning, match=r"'projector\+lm' is deprecated, write 'all'"):
        assert load_config(raw=raw("projector+lm")).stages[0].trainable == "all"
    with pytest.raises(ConfigError, match=r"stages.0.trainable: 'everything' is not one of"):
        load_config(raw=raw("everything"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_recipes_use_current_names(path, recwarn):
    load_config(path)
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning) and "trainable" in str(w.message)]


def test_validation_errors():
    base = {"stages": [{"name": "text", "tokens": 100, "checkpoint_fractions": [0.5, 1.0]},
                       {"name": "img", "tokens": 100, "init": {"stage": "text", "fraction": 0.8},
                        "schedule": {"kind": "continue"}}]}
    with pytest.raises(ConfigError, match=r"fraction 0.8, which that stage never saves .*\[0.5, 1.0\]"):
        load_config(raw=base)
    with pytest.raises(ConfigError, match="not an earlier stage"):
        load_config(raw={"stages": [{"name": "a", "tokens": 1, "init": {"stage": "b", "fraction": 1.0}}]})
    with pytest.raises(ConfigError, match="sum to 1.2"):
        load_config(raw={"stages": [{"name": "a", "tokens": 1, "mixture": {"text": 1.0, "captions": 0.2}}]})
    with pytest.raises(ConfigError, match="num_attention_heads must be divisible by parallel.tp"):
        load_config(raw={"model": {"num_attention_heads": 3, "hidden_size": 96}, "parallel": {"tp": 2}})
    with pytest.raises(ConfigError, match="needs init.stage"):
        load_config(raw={"stages": [{"name": "a", "tokens": 1, "schedule": {"kind": "continue"}}]})


def test_dump_roundtrip(tmp_path):
    run = load_config(CONFIGS[0])
    run.dump(tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == run
    assert not list(tmp_path.glob("*.tmp"))


def test_stage_optimizer_resolves_overrides():
    from megavlm.config import OptimizerConfig, StageConfig

    t = OptimizerConfig(weight_decay=0.1, adam_beta2=0.95)
    assert StageConfig(tokens=1).optimizer(t).weight_decay == 0.1
    o = StageConfig(tokens=1, weight_decay=0.0, adam_beta2=0.999).optimizer(t)
    assert (o.weight_decay, o.adam_beta2, o.adam_beta1, o.grad_clip) == (0.0, 0.999, t.adam_beta1, t.grad_clip)


def test_override_below_a_yaml_null_creates_the_section(tmp_path):
    """``logging.wandb.project=x`` over ``wandb: null`` used to be dropped (the override went into a
    detached dict); the same held for ``schedule.source`` below ``source: null``."""
    import yaml

    from megavlm.config import load_config

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "logging": {"wandb": None},
        "stages": [{"name": "text", "tokens": 1000},
                   {"name": "img", "tokens": 1000, "init": {"path": "/x"},
                    "schedule": {"kind": "continue", "source": None}}]}))
    run = load_config(recipe, ["logging.wandb.project=x", "stages.img.schedule.source.peak=0.01",
                               "stages.img.schedule.source.final=1e-5",
                               "stages.img.schedule.source.warmup_steps=5",
                               "stages.img.schedule.source.steps=100",
                               "stages.img.schedule.source.fraction=0.8"])
    assert run.logging.wandb is not None and run.logging.wandb.project == "x"
    assert run.stage("img").schedule.source.fraction == 0.8


def test_override_into_a_scalar_is_an_error_naming_it(tmp_path):
    import pytest

    from megavlm.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="seed"):
        load_config(None, ["seed.x=1"])


def test_old_train_keys_still_read_for_one_release_with_a_warning(tmp_path):
    """The single train section was split by concern; old recipes, overrides and saved config.yaml
    files keep working (with a DeprecationWarning naming the new key) for one release."""
    import pytest
    import yaml

    from megavlm.config import ConfigError, load_config

    recipe = tmp_path / "old.yaml"
    recipe.write_text(yaml.safe_dump({"train": {"micro_batch_size": 2, "global_batch_size": 4, "precision": "fp32",
                                                "weight_decay": 0.05, "log_every": 7, "wandb": None,
                                                "spike_factor": 3.0, "stop_signals": ["SIGUSR1"]},
                                      "stages": [{"name": "t", "tokens": 10}]}))
    with pytest.warns(DeprecationWarning, match=r"train.precision -> precision.dtype"):
        run = load_config(recipe)
    assert (run.precision.dtype, run.optimizer.weight_decay, run.logging.log_every) == ("fp32", 0.05, 7)
    assert run.guard.spike_factor == 3.0 and run.preemption.stop_signals == ["SIGUSR1"]
    assert run.train.micro_batch_size == 2
    with pytest.warns(DeprecationWarning, match=r"override train.wandb.project is deprecated, write logging.wandb.project"):
        assert load_config(recipe, ["train.wandb.project=x"]).logging.wandb.project == "x"
    with pytest.raises(ConfigError, match="both train.log_every .* and logging.log_every"):
        load_config(raw={"train": {"log_every": 1}, "logging": {"log_every": 2}})
    with pytest.raises(ConfigError, match=r"unknown config key 'train.weight_decy'"):
        load_config(raw={"train": {"weight_decy": 1}})
    with pytest.raises(ConfigError, match=r"unknown config key 'optimizer.weight_decy'; did you mean 'weight_decay'"):
        load_config(raw={"optimizer": {"weight_decy": 1}})


def test_run_identity_is_declared_by_the_sections():
    from megavlm.preflight import config_differences, non_identity_keys

    keys = non_identity_keys()
    assert {"run_dir", "parallel", "guard", "preemption", "logging", "train.micro_batch_size",
            "data.root", "stages.*.save_every", "eval"} == set(keys)
    old = {"train": {"global_batch_size": 8, "log_every": 1, "weight_decay": 0.1}, "stages": [{"name": "t"}]}
    new = {"train": {"global_batch_size": 8}, "logging": {"log_every": 5}, "optimizer": {"weight_decay": 0.1},
           "stages": [{"name": "t"}]}
    assert config_differences(old, new) == []  # a run folder of the old layout resumes unchanged
    new["optimizer"]["weight_decay"] = 0.2
    assert config_differences(old, new) == ["optimizer.weight_decay: 0.1 -> 0.2"]
