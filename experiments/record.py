"""Record an environment for replay: ``python -m experiments.record env=per_input_discrete split=train``.

Runs every discrete action path of the environment (:func:`envs.record.record_input`) on every input
of a split and writes a replay dataset (:mod:`envs.data.records`): Parquet shards of ``shard_size``
inputs and a card. A shard is written whole or not at all and the card is rewritten after each one,
so ``resume=true`` (same ``out``) continues where a killed run stopped; ``budget_min`` records as
many inputs as fit in that many minutes. With ``workers`` > 0 the shards fan out over Ray workers
(the ``cluster`` config group, as for training), each building its own environment and model copy;
each shard records its machine, and replay refuses a dataset that mixes machine kinds.

``recording(cfg)`` is the plain function behind the entry point; tests call it directly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from envs.data.records import FORMAT, VERSION, read_card, write_card, write_shard
from experiments.cli import hydra_main

log = logging.getLogger("prunegym.record")


def record_settings(cfg: DictConfig) -> tuple[str, dict[str, Any]]:
    """The env id and kwargs to record: the training layer's settings, with the split and the calibrated cost."""
    from experiments.train import env_settings

    env_id, kwargs = env_settings(cfg)
    kwargs.update(split=str(cfg.split), n_items=cfg.n_items, cost="calibrated")
    kwargs.setdefault("calibrate_cost", True)
    return env_id, kwargs


def check_settings(cfg: DictConfig) -> None:
    """Refuse settings out of range before anything is built."""
    for key, low in (("repeats", 1), ("shard_size", 1), ("workers", 0)):
        value = cfg.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{key}={value!r} is out of range: set {key}=<integer >= {low}>")
    if cfg.get("budget_min") is not None and not float(cfg.budget_min) > 0:
        raise ValueError(f"budget_min={cfg.budget_min!r} must be > 0 minutes, or null for no limit")
    if cfg.get("n_items") is not None and int(cfg.n_items) < 1:
        raise ValueError(f"n_items={cfg.n_items!r} must be >= 1, or null for the whole split")


def _shards(n: int, size: int) -> list[list[int]]:
    return [list(range(s, min(s + size, n))) for s in range(0, n, size)]


def record_shard(
    env_id: str, kwargs: dict[str, Any], folder: str, index: int, items: list[int], repeats: int, seed: int
):
    """Record the inputs ``items`` into shard ``index`` of ``folder``; returns the shard's card entry."""
    from envs import make_env
    from envs.record import record_input

    env = make_env(env_id, **kwargs)
    try:
        rows = [row for i in items for row in record_input(env.unwrapped, i, repeats=repeats, seed=seed)]
    finally:
        env.close()
    return write_shard(folder, index, rows)


def _ray_record_shard(*args: Any) -> Any:
    return record_shard(*args)


def recording(cfg: DictConfig) -> Path:
    """Record ``cfg.env`` on ``cfg.split`` into ``cfg.out``; returns the dataset folder."""
    from tqdm import tqdm

    from envs import make_env
    from envs.measure.meters import device_description, package_versions
    from envs.record import check_recordable

    check_settings(cfg)
    env_id, kwargs = record_settings(cfg)
    env = make_env(env_id, **kwargs)
    try:
        config = env.unwrapped.config()
        paths = check_recordable(env.unwrapped)
        n_inputs = len(env.unwrapped.items)
        steps = env.unwrapped.num_groups if config["env"] == "LayerByLayer" else 1
        n_actions = len(env.unwrapped.presets)
    finally:
        env.close()
    name = f"{config['env']}-{config['model']['name'].replace('/', '--')}"
    out = Path(str(cfg.out)) if cfg.get("out") else Path("outputs") / "record" / name / str(cfg.split)
    out.mkdir(parents=True, exist_ok=True)
    card: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "command": "python -m experiments.record " + " ".join(_overrides()),
        "env": config,
        "env_id": env_id,
        "env_kwargs": kwargs,
        "n_actions": n_actions,
        "steps": steps,
        "paths_per_input": paths,
        "repeats": int(cfg.repeats),
        "shard_size": int(cfg.shard_size),
        "inputs_planned": n_inputs,
        "seed": int(cfg.seed),
        "machine": device_description(),
        "packages": package_versions(("torch", "transformers", "numpy", "pyarrow", "prunegym")),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "shards": [],
    }
    done: dict[int, dict[str, Any]] = {}
    elapsed_before = 0.0  # seconds spent recording by earlier (resumed) runs into the same out
    timed_before = 0  # inputs those runs recorded (a run before elapsed_s was kept counts in neither)
    if (out / "card.json").is_file():
        old = read_card(out)
        if not cfg.resume:
            raise FileExistsError(f"{out} already holds a dataset: pass resume=true to continue it, or another out=")
        same = {k: old.get(k) == card[k] for k in ("n_actions", "steps", "repeats", "shard_size", "seed")}
        same.update({f"env.{k}": old["env"].get(k) == config.get(k) for k in ("interface", "model", "data")})
        differ = sorted(k for k, ok in same.items() if not ok)
        if differ:
            raise ValueError(f"resume=true, but {differ} differ from the dataset in {out}: record into another out=")
        card["created"] = old.get("created", card["created"])
        elapsed_before = float(old.get("elapsed_s") or 0.0)
        timed_before = int(old.get("elapsed_inputs") or 0)
        done = {int(s["index"]): s for s in old.get("shards", []) if (out / s["file"]).is_file()}
    card["shards"] = [done[k] for k in sorted(done)]
    todo = [(k, items) for k, items in enumerate(_shards(n_inputs, int(cfg.shard_size))) if k not in done]
    budget_s = None if cfg.get("budget_min") is None else float(cfg.budget_min) * 60.0
    t0 = time.perf_counter()
    args = (env_id, kwargs, str(out), int(cfg.repeats), int(cfg.seed))
    bar = tqdm(total=len(todo), desc=f"recording {name} {cfg.split} ({paths} paths per input)", unit="shard")
    timed = timed_before
    for entry in _run_shards(cfg, todo, args, budget_s, t0):
        done[int(entry["index"])] = entry
        card["shards"] = [done[k] for k in sorted(done)]
        timed += len(entry["inputs"])
        card["elapsed_s"], card["elapsed_inputs"] = elapsed_before + time.perf_counter() - t0, timed
        write_card(out, card)
        bar.update()
    bar.close()
    card["elapsed_s"], card["elapsed_inputs"] = elapsed_before + time.perf_counter() - t0, timed
    write_card(out, card)
    inputs = sum(len(s["inputs"]) for s in card["shards"])
    minutes = (time.perf_counter() - t0) / 60
    log.info("%s: %d of %d inputs recorded (%d paths each) in %.1f min", out, inputs, n_inputs, paths, minutes)
    print(f"replay dataset: {out} ({inputs}/{n_inputs} inputs, {paths} paths each, {minutes:.1f} min)")
    return out


def _run_shards(
    cfg: DictConfig, todo: list[tuple[int, list[int]]], args: tuple, budget_s: float | None, t0: float
) -> Iterator[dict[str, Any]]:
    """Shard entries as they finish: in this process, or on Ray workers; no new shard starts past the budget."""
    env_id, kwargs, out, repeats, seed = args

    def in_time() -> bool:
        return budget_s is None or time.perf_counter() - t0 < budget_s

    if int(cfg.workers) == 0:
        for k, items in todo:
            if not in_time():
                return
            yield record_shard(env_id, kwargs, out, k, items, repeats, seed)
        return
    import ray

    from experiments.train import ray_session

    with ray_session(cfg.cluster, Path(out)):
        remote = ray.remote(num_cpus=1)(_ray_record_shard)
        pending: list[Any] = []
        queue = list(todo)
        while queue or pending:
            while queue and len(pending) < int(cfg.workers) and in_time():
                k, items = queue.pop(0)
                pending.append(remote.remote(env_id, kwargs, out, k, items, repeats, seed))
            if not pending:
                return
            ready, pending = ray.wait(pending, num_returns=1)
            yield ray.get(ready[0])
            if not in_time():
                queue.clear()


def _overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


@hydra_main(config_name="record")
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    log.info("record settings:\n%s", OmegaConf.to_yaml(cfg))
    recording(cfg)


if __name__ == "__main__":
    main()
