"""Tools beside the runtime: synthetic checkpoints, conversion, chat templates."""
