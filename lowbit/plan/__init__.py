"""`lowbit plan`: from a model's config, a scheme (or recipe) and a GPU type: weight bytes, KV bytes per token, memory
per GPU, the fewest GPUs, the recommended tp/ep/dp/pp layout and the concurrent tokens its KV cache holds.

    inventory.py  every checkpoint tensor of a config (name, shape, kind, sharding)
    memory.py     bytes under a recipe, KV and workspace, layouts and what one GPU holds
    planner.py    one plan with its warnings;  catalog.py  GPU types and built-in configs;  cli.py  the verb
"""
from lowbit.plan.cli import add_arguments, run  # noqa: F401  (the CLI verb)
from lowbit.plan.planner import Plan, make_plan  # noqa: F401
