"""pneumo.specs: the small languages of params.yaml, parsed in one place."""

from __future__ import annotations

import pytest

from pneumo.specs import DeviceChoice, ThresholdRule, View


@pytest.mark.parametrize(
    ("spec", "view"),
    [
        ("identity", View("identity")),
        ("hflip", View("hflip")),
        ("rotate:-10", View("rotate", -10.0)),
        ("rotate:7.5", View("rotate", 7.5)),
        ("scale:1.1", View("scale", 1.1)),
    ],
)
def test_views_parse_to_their_kind_and_amount(spec, view):
    assert View.parse(spec) == view


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        ("vflip", "unknown view 'vflip'"),
        ("rotate:", "unknown view"),
        ("rotate:181", "rotate by -180 to 180"),
        ("scale:3", "scale by a factor from 0.5 to 2"),
        (" identity", "unknown view"),
    ],
)
def test_bad_views_say_what_is_allowed(spec, error):
    with pytest.raises(ValueError, match=error):
        View.parse(spec)


def test_threshold_rules():
    assert ThresholdRule.parse(0.8) == ThresholdRule(fixed=0.8)
    assert ThresholdRule.parse("youden") == ThresholdRule()
    assert ThresholdRule.parse("recall>=0.95") == ThresholdRule(min_recall=0.95)
    assert ThresholdRule.parse("recall>=1") == ThresholdRule(min_recall=1.0)
    for bad in ("recall>=1.5", "Youden", 1.0, 0, True, float("nan")):
        with pytest.raises(ValueError):
            ThresholdRule.parse(bad)


def test_devices():
    assert DeviceChoice.parse("cuda") == DeviceChoice("cuda")
    assert DeviceChoice.parse("cuda:1") == DeviceChoice("cuda", 1)
    assert DeviceChoice.parse("auto") == DeviceChoice("auto")
    for bad in ("gpu", "cuda:x", "cpu:0", "CUDA"):
        with pytest.raises(ValueError, match="allowed: auto, cpu, cuda, cuda:<N>, mps"):
            DeviceChoice.parse(bad)
