import json

import pytest

from millis.optimize.config import Budget, MeasureConfig, OptimizeConfig, optimize_config_from_dict
from millis.common.config import Shape, to_dict
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


def test_config_is_frozen():
    cfg = OptimizeConfig(source="x")
    with pytest.raises(Exception):
        cfg.task = "classify"  # type: ignore[misc]
