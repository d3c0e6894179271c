"""PruneGym entry points (Hydra and argparse commands) and their reports."""
