"""PruneGym environments and everything they wrap: models, sparsity plans, meters, tasks, rewards.

Every environment is registered here, in one place, with ids ``PruneGym/<Name>-v0``. Registration
only names entry points (strings), so ``import envs`` does not load torch or a model.

| id | env | cost |
| --- | --- | --- |
| ``PruneGym/PerInput-v0`` / ``PerInputDiscrete-v0`` | :class:`envs.per_input.PerInput` | calibrated (deterministic) |
| ``PruneGym/LayerByLayer-v0`` / ``LayerByLayerDiscrete-v0`` | :class:`envs.layer_by_layer.LayerByLayer` | calibrated |
| ``PruneGym/PerToken-v1`` / ``PerTokenDiscrete-v1`` | :class:`envs.per_token.PerToken` | calibrated |
| ``PruneGym/Staged-v0`` / ``StagedDiscrete-v0`` | :class:`envs.staged.Staged` | calibrated |
| ``PruneGym/<Name>Measured-vN`` (each of the eight) | the same, ``cost="measured"`` | wall clock, nondeterministic |
| ``PruneGym/PerInputDiscreteReplay-v0`` / ``LayerByLayerDiscreteReplay-v0`` | :class:`envs.replay.Replay` | recorded |
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

ENVS: dict[str, str] = {
    "PerInput": "envs.per_input:PerInput",
    "LayerByLayer": "envs.layer_by_layer:LayerByLayer",
    "PerToken": "envs.per_token:PerToken",
    "Staged": "envs.staged:Staged",
}
# A change to what an observation, action or reward means bumps the version (see each Version History).
ENV_VERSIONS: dict[str, int] = {"PerInput": 0, "LayerByLayer": 0, "PerToken": 1, "Staged": 0}
MAX_EPISODE_STEPS: dict[str, int | None] = {"PerInput": None, "LayerByLayer": None, "PerToken": None, "Staged": None}


# Replay twins (envs/replay.py): the recorded discrete variant of an environment, replayed by look-up.
REPLAYS: dict[str, str] = {"PerInput": "envs.replay:Replay", "LayerByLayer": "envs.replay:Replay"}
REPLAY_VERSION = 0


def replay_id(name: str) -> str:
    """The registered id of the replay twin of environment ``name``'s discrete variant."""
    if name not in REPLAYS:
        raise ValueError(f"no replay twin of {name!r}; twins exist for {sorted(REPLAYS)}")
    return f"PruneGym/{name}DiscreteReplay-v{REPLAY_VERSION}"


def replay_ids() -> list[str]:
    """Every registered replay twin's id."""
    return [replay_id(name) for name in REPLAYS]


def env_id(name: str, *, discrete: bool = False, measured: bool = False) -> str:
    """The registered id of environment ``name`` (a key of :data:`ENVS`) and variant."""
    if name not in ENVS:
        raise ValueError(f"unknown PruneGym environment {name!r}; known: {sorted(ENVS)}")
    return f"PruneGym/{name}{'Discrete' if discrete else ''}{'Measured' if measured else ''}-v{ENV_VERSIONS[name]}"


def env_ids() -> list[str]:
    """Every registered PruneGym id."""
    return [env_id(name, discrete=d, measured=m) for name in ENVS for d in (False, True) for m in (False, True)]


def _register() -> None:
    try:
        from gymnasium.envs.registration import register, registry
    except ImportError:  # torch-only machines (the GPU benchmarks) use envs without the environments
        return

    for name, entry in ENVS.items():
        for discrete in (False, True):
            for measured in (False, True):
                eid = env_id(name, discrete=discrete, measured=measured)
                if eid in registry:
                    continue
                register(
                    id=eid,
                    entry_point=entry,
                    kwargs={"discrete": discrete, "cost": "measured" if measured else "calibrated"},
                    nondeterministic=measured,
                    max_episode_steps=MAX_EPISODE_STEPS[name],
                    disable_env_checker=False,
                )
    for name, entry in REPLAYS.items():
        rid = replay_id(name)
        if rid not in registry:
            register(
                id=rid, entry_point=entry, kwargs={"kind": name}, nondeterministic=False, disable_env_checker=False
            )


def make_env(env: str | Mapping[str, Any], **kwargs: Any) -> Any:
    """``gymnasium.make`` for an id, or for a config of the shape of ``conf/env/*.yaml``.

    Args:
        env: An id (``"PruneGym/PerInput-v0"``) or a mapping ``{"id": ..., "kwargs": {...}}``
            (e.g. Hydra's ``cfg.env``).
        **kwargs: Overrides of the config's kwargs.
    """
    import gymnasium as gym

    if isinstance(env, Mapping):
        if "id" not in env:
            raise ValueError(f"an env config needs an 'id' (and optional 'kwargs'), got keys {sorted(env)}")
        merged = {**dict(env.get("kwargs") or {}), **kwargs}
        return gym.make(str(env["id"]), **merged)
    return gym.make(env, **kwargs)


_register()
