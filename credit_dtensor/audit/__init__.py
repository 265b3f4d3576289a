"""Sharding audit: what the converter will do to each module, and what cannot be exact.

``plan(model, domain, input_shape)`` runs the *plain* model once on the ``meta`` device (no
memory, no compute; a real zero input on CPU if a meta run fails) with forward hooks for shapes
and a ``TorchFunctionMode`` that follows where H is in every tensor. Each module gets a row:

* the rule it runs under -- ``halo`` (rows fetched from other shards, per side), ``distributed
  stats``, ``re-chunk`` (padding), ``resample``, ``shard-local`` (declared), ``local``, ``custom``,
  ``unsupported`` (no exact rule: refused) or ``unknown`` (H could not be followed);
* the minimum local H the rule needs (``0``: any shard size, empty shards included);
* hazards -- operations whose meaning changes when H is split: attention / window partitioning
  over H (a reshape that splits or merges H), Linear or matmul contracting H, softmax and global
  over H without an exact rule, indexing one row of H. Inside a module declared shard-local they are notes: they act on local rows.

A shard-local module whose windows do not fit the shards for the given input is an error: the
plan says so before anything runs, with the largest domain size that would work.
"""

from __future__ import annotations

from .planner import plan
from .report import Plan, PlanRow, render_plan

__all__ = ["plan", "Plan", "PlanRow", "render_plan"]
