"""PruneGym agents: RL algorithm configs, baselines and standalone controllers."""
