"""The small languages inside params.yaml, each defined once: TTA views, threshold rules,
referral rules and devices. ``parse`` turns the text into a typed value or raises
``ValueError`` with what is allowed; config validates with it and the code that acts on a value
(inference, metrics, referral, devices) reads the typed value, never the text. The text stays
what records and MLflow keep, so a model folder's JSON reads back the same way (the served
model ships this module)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

TTA_MAX_DEGREES = 180.0
TTA_SCALES = (0.5, 2.0)
_VIEW = re.compile(
    r"identity|hflip|rotate:(?P<degrees>[+-]?\d+(\.\d+)?)|scale:(?P<factor>\d+(\.\d+)?)"
)
_RULE = re.compile(r"youden|recall>=(?P<recall>0(\.\d+)?|1(\.0+)?)")
_REFERRAL_PART = re.compile(r"(?P<metric>sensitivity|specificity)>=(?P<floor>0(\.\d+)?|1(\.0+)?)")
_DEVICE = re.compile(r"(?P<kind>auto|cpu|mps|cuda)(:(?P<index>\d+))?")


@dataclass(frozen=True)
class View:
    """One test-time view: ``identity``, ``hflip``, ``rotate:<degrees>``, ``scale:<factor>``."""

    kind: Literal["identity", "hflip", "rotate", "scale"]
    amount: float = 0.0  # degrees for rotate, factor for scale

    @classmethod
    def parse(cls, spec: str) -> View:
        match = _VIEW.fullmatch(spec)
        if not match:
            raise ValueError(
                f"unknown view {spec!r}; allowed: identity, hflip, rotate:<degrees>, scale:<factor>"
            )
        if match["degrees"]:
            degrees = float(match["degrees"])
            if abs(degrees) > TTA_MAX_DEGREES:
                raise ValueError(f"{spec!r}: rotate by -{TTA_MAX_DEGREES:g} to {TTA_MAX_DEGREES:g}")
            return cls("rotate", degrees)
        if match["factor"]:
            factor, (low, high) = float(match["factor"]), TTA_SCALES
            if not low <= factor <= high:
                raise ValueError(f"{spec!r}: scale by a factor from {low:g} to {high:g}")
            return cls("scale", factor)
        return cls(spec)  # type: ignore[arg-type]  # identity or hflip, matched above


@dataclass(frozen=True)
class ThresholdRule:
    """A fixed threshold, or a rule applied to validation predictions: ``youden`` or
    ``recall>=X``."""

    fixed: float | None = None
    min_recall: float | None = None  # recall>=X; youden when neither is set

    @classmethod
    def parse(cls, value: float | str) -> ThresholdRule:
        if isinstance(value, str):
            match = _RULE.fullmatch(value)
            if not match:
                raise ValueError(f"{value!r} is neither a number nor 'youden' nor 'recall>=X'")
            recall = match["recall"]
            return cls(min_recall=float(recall)) if recall is not None else cls()
        if not (finite_number(value) and 0.0 < value < 1.0):
            raise ValueError("a fixed threshold is a number strictly between 0 and 1")
        return cls(fixed=float(value))


@dataclass(frozen=True)
class ReferralRule:
    """``none``, or the floors the answered images must meet on validation, comma-separated:
    ``sensitivity>=X`` (at most 1-X of the PNEUMONIA images answered NORMAL) and/or
    ``specificity>=Y`` (at most 1-Y of the NORMAL images answered PNEUMONIA)."""

    min_sensitivity: float | None = None
    min_specificity: float | None = None

    @classmethod
    def parse(cls, value: str) -> ReferralRule:
        if value == "none":
            return cls()
        floors: dict[str, float] = {}
        for part in value.split(","):
            match = _REFERRAL_PART.fullmatch(part.strip())
            if not match or match["metric"] in floors:
                raise ValueError(
                    f"{value!r} is neither 'none' nor a rule such as "
                    "'sensitivity>=0.98,specificity>=0.95' (each floor at most once)"
                )
            floors[match["metric"]] = float(match["floor"])
        return cls(floors.get("sensitivity"), floors.get("specificity"))


@dataclass(frozen=True)
class DeviceChoice:
    """``auto``, ``cpu``, ``cuda`` (the process's own GPU), ``cuda:N`` or ``mps``."""

    kind: Literal["auto", "cpu", "cuda", "mps"]
    index: int | None = None

    @classmethod
    def parse(cls, choice: str) -> DeviceChoice:
        match = _DEVICE.fullmatch(choice)
        if not match or (match["index"] is not None and match["kind"] != "cuda"):
            raise ValueError(f"unknown device {choice!r}; allowed: auto, cpu, cuda, cuda:<N>, mps")
        index = match["index"]
        return cls(match["kind"], None if index is None else int(index))  # type: ignore[arg-type]


def finite_number(value: object) -> bool:
    """A real number that is not a bool (YAML's true is 1), inf or nan."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
