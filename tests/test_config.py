import json

import pytest

from millis.optimize.config import PRESETS, Budget, MeasureConfig, OptimizeConfig, optimize_config_from_dict
from millis.common.config import Shape, preset_of, to_dict
from millis.common.errors import MillisError


def test_shape_parse_forms():
    assert Shape.parse("b1xs128") == Shape(1, 128)
    assert Shape.parse("8x128") == Shape(8, 128)
    assert Shape.parse("2,16").name == "b2xs16"
    with pytest.raises(MillisError, match="cannot parse shape"):
        Shape.parse("b1")
    with pytest.raises(MillisError, match="batch >= 1"):
        Shape(0, 16)


def test_optimize_config_json_round_trip():
    cfg = OptimizeConfig(source="tiny:bert", task="classify", out="x", variants=("ort-int8-dynamic",),
                         target=Shape(1, 16), budget=Budget(min_cosine=0.995),
                         measure=MeasureConfig(shapes=(Shape(1, 16), Shape(8, 128)), iters=50))
    d = json.loads(json.dumps(to_dict(cfg)))
    assert d["target"] == "b1xs16" and d["measure"]["shapes"] == ["b1xs16", "b8xs128"]
    assert optimize_config_from_dict(d) == cfg


def test_unknown_task_is_a_clear_error():
    with pytest.raises(MillisError, match="supported tasks: classify, embed"):
        OptimizeConfig(source="x", task="generate")


def test_unknown_preset_is_one_line_with_the_choices():
    with pytest.raises(MillisError, match=r"^unknown --preset 'fast'; available: cpu, quick$"):
        preset_of(PRESETS, "fast", "--preset")
    assert preset_of(PRESETS, "quick", "--preset") is PRESETS["quick"]


def test_every_preset_of_every_table_builds_its_config():
    """A preset is a set of typed overrides: a misspelt field or a wrong type fails here, not in a user's run."""
    from millis.optimize.compress import COMPRESS_PRESETS, CompressRecipe
    from millis.train.classify import TRAIN_PRESETS, TrainConfig, train_config
    from millis.train.distill import DISTILL_PRESETS, distill_config
    from millis.train.prune import PRUNE_PRESETS, prune_config

    assert all(isinstance(m, MeasureConfig) for m in PRESETS.values()) and PRESETS["cpu"] == MeasureConfig()
    assert PRESETS["quick"].iters < MeasureConfig().iters
    for name, overrides in TRAIN_PRESETS.items():
        cfg = train_config("tiny:bert", "d.csv", name)
        assert all(getattr(cfg, k) == v and type(getattr(TrainConfig("s", "d"), k)) is type(v)
                   for k, v in overrides.items())
    for name in DISTILL_PRESETS:
        assert distill_config("t", "d.csv", name).train.out == "models/student"
    for name, overrides in PRUNE_PRESETS.items():
        cfg = prune_config("m", "d.csv", name, heads=0.5)
        assert cfg.train.out == "models/pruned" and all(getattr(cfg.train, k) == v for k, v in overrides.items())
    assert all(recipes and all(isinstance(r, CompressRecipe) for r in recipes) for recipes in COMPRESS_PRESETS.values())
    for build, what in ((lambda: train_config("s", "d", "cpu"), "training preset 'cpu'"),
                        (lambda: distill_config("s", "d", "cpu"), "distillation preset 'cpu'"),
                        (lambda: prune_config("s", "d", "cpu", heads=0.5), "pruning preset 'cpu'")):
        with pytest.raises(MillisError, match=f"unknown {what}; available: default, quick"):
            build()


def test_a_bad_recorded_config_names_the_field_and_the_file():
    d = to_dict(OptimizeConfig(source="tiny:bert"))
    with pytest.raises(MillisError, match=r"^a/millis.json: field 'target' should be a shape name"):
        optimize_config_from_dict({**d, "target": 5}, "a/millis.json")
    with pytest.raises(MillisError, match=r"measure.iters"):
        optimize_config_from_dict({**d, "measure": {**d["measure"], "iters": "many"}}, "a/millis.json")
    assert optimize_config_from_dict({**d, "unknown_later_field": 1}) == OptimizeConfig(source="tiny:bert")


def test_switch_variables_read_as_booleans(monkeypatch):
    from millis.common.config import env_switch
    from millis.kernels.native import native_isa

    monkeypatch.setenv("MILLIS_NO_KERNELS", "0")  # "0" turned the kernels off: any non-empty value did
    assert not env_switch("MILLIS_NO_KERNELS")
    before = native_isa()
    for off in ("1", "true", "on", " yes "):
        monkeypatch.setenv("MILLIS_NO_KERNELS", off)
        assert env_switch("MILLIS_NO_KERNELS") and native_isa() is None
    for unset in ("", "  ", "off", "no"):
        monkeypatch.setenv("MILLIS_NO_KERNELS", unset)
        assert native_isa() == before
    monkeypatch.setenv("MILLIS_NO_KERNELS", "maybe")
    with pytest.raises(MillisError, match=r"MILLIS_NO_KERNELS='maybe': expected one of 1, true"):
        native_isa()


def test_fewer_timed_calls_than_rounds_is_refused():
    """Each round times at least one call: --iters 3 over 5 rounds timed 5 calls."""
    with pytest.raises(MillisError, match="--iters 3 is fewer than the 5 rounds"):
        MeasureConfig(shapes=(Shape(1, 16),), iters=3, rounds=5)
    assert MeasureConfig(shapes=(Shape(1, 16),), iters=5, rounds=5).iters == 5
