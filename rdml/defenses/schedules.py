"""Destination pseudo-hardness functions for HM (the Gradual Adversary family, HM paper §3.2).

Every function maps the previous iteration's adversarial triplet loss ``l_prev`` (without ICS) to a
destination hardness H_D. The loss is first clipped and normalised, ``l̄ = min(u, max(0, l_prev)) / u``
(u = gamma = 0.2 in the paper), so that a high loss (early training) gives a weak adversary and a low
loss a strong one. gamma is the triplet margin (read from the loss config, not hard-coded as -0.2
like the reference code). ``l_prev`` starts at 2.0, so the very first step uses the weakest target.

* ``lga``      g_LGA  = -gamma * l̄                       (linear, the paper's default)
* ``g2``       g_2    = -gamma * l̄**2                    (eager)
* ``gsqrt``    g_1/2  = -gamma * l̄**0.5                  (conservative)
* ``boost``    g_B    = H_D(dst sampler) + xi * (1 - l̄) (per-triplet; needs a destination sampler)
* ``constant`` H_D    = hm_constant                      (HM[S,0], HM[S,-gamma/2], ...)
* ``linear``   H_D    = start + (end - start) * progress (rdml's ramp in training progress; no loss feedback)
* ``none``     H_D    = destination sampler's per-triplet hardness
"""

from __future__ import annotations

import math

INITIAL_PREVIOUS_LOSS = 2.0
"""The reference code's initial l_prev: the first step uses the weakest gradual destination."""

SCHEDULES = ("none", "lga", "boost", "g2", "gsqrt", "constant", "linear")
"""Every destination schedule HM knows (``defense.hm_schedule``)."""


def normalised_loss(l_prev: float, u: float) -> float:
    """l̄ = min(u, max(0, l_prev)) / u, in [0, 1]."""
    return min(u, max(0.0, float(l_prev))) / u


def lga(l_prev: float, gamma: float, u: float) -> float:
    return -gamma * normalised_loss(l_prev, u)


def g2(l_prev: float, gamma: float, u: float) -> float:
    return -gamma * normalised_loss(l_prev, u) ** 2


def gsqrt(l_prev: float, gamma: float, u: float) -> float:
    return -gamma * math.sqrt(normalised_loss(l_prev, u))


def boost_offset(l_prev: float, xi: float, u: float) -> float:
    """The amount g_B adds to each sampler destination: xi * (1 - l̄)."""
    return xi * (1.0 - normalised_loss(l_prev, u))


def linear(progress: float, start: float, end: float) -> float:
    p = min(1.0, max(0.0, float(progress)))
    return start + (end - start) * p


def scalar_destination(schedule, gamma: float, l_prev: float, progress: float, *, u: float = 0.2,
                       constant: float = -0.1, ramp_start: float = -0.2, ramp_end: float = 0.0) -> float:
    """H_D for the scalar schedules (every one but ``none`` and ``boost``, which are per-triplet).

    ``schedule`` is a schedule name with its parameters as keywords, or a :class:`rdml.config.DefenseConfig`
    (its ``hm_schedule``, ``hm_u``, ``hm_constant``, ``hm_ramp_start``, ``hm_ramp_end``).
    """
    if not isinstance(schedule, str):
        cfg = schedule
        schedule, u, constant = cfg.hm_schedule, cfg.hm_u, cfg.hm_constant
        ramp_start, ramp_end = cfg.hm_ramp_start, cfg.hm_ramp_end
    if schedule == "lga":
        return lga(l_prev, gamma, u)
    if schedule == "g2":
        return g2(l_prev, gamma, u)
    if schedule == "gsqrt":
        return gsqrt(l_prev, gamma, u)
    if schedule == "constant":
        return float(constant)
    if schedule == "linear":
        return linear(progress, ramp_start, ramp_end)
    raise ValueError(f"schedule {schedule!r} has no scalar destination")
