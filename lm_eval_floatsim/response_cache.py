"""lm-eval's response cache (`--use_cache PATH`) held to the settings of the run that filled it.

lm-eval's CachingLM keys a cached response by the request alone: a second run of another mode,
divisor, rounding, clamp, scales or model sharing the database would get the first run's answers
and report them as its own. lm-eval hands the model the database through `set_cache_hook` before
any request is looked up; `claim` stores the run's settings in it under `IDENTITY_KEY` (a key no
request hash can take: those are sha256 hex digests) and refuses a database that holds responses
of other settings, with one line naming `use_cache` and what differs.
"""

from __future__ import annotations

import json
import logging

from .errors import InputError

logger = logging.getLogger("lm_eval.models.mamba_floatsim")

IDENTITY_KEY = "lm_eval_floatsim/run-settings"


def claim(database, settings: dict) -> int:
    """Bind `database` (lm-eval's SqliteDict) to `settings`; return how many responses it already holds.

    An empty database is bound to `settings`. A database bound to other settings, or holding
    responses of a run that recorded none (another model, or a run before this check), is refused.
    """
    wanted = json.dumps(settings, sort_keys=True)
    stored = database[IDENTITY_KEY] if IDENTITY_KEY in database else None
    responses = len(database) - (stored is not None)
    where = getattr(database, "filename", "the response cache")
    if stored is None and responses:
        raise InputError(
            f"use_cache: {where} holds {responses} responses of a run whose settings were not recorded "
            "(another model or an older lm-eval-floatsim): give this run its own --use_cache path"
        )
    if stored is None:
        database[IDENTITY_KEY] = wanted
        database.commit()
        return 0
    if stored != wanted:
        raise InputError(
            f"use_cache: {where} holds responses of other settings ({differences(json.loads(stored), settings)}): "
            "give each mode, divisor, model and scales its own --use_cache path"
        )
    if responses:
        logger.warning(
            "use_cache: %d responses of these settings come from %s; they are not recomputed, so this "
            "run's per-layer statistics cover only the requests computed now",
            responses,
            where,
        )
    return responses


def differences(cached: dict, current: dict) -> str:
    """'mode: cached 'fp', this run 'int8'; ...' over every setting that differs."""
    names = sorted(set(cached) | set(current))
    return "; ".join(
        f"{name}: cached {cached.get(name)!r}, this run {current.get(name)!r}"
        for name in names
        if cached.get(name) != current.get(name)
    )
