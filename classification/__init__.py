"""Fine-tuning framework around ``asi_core``: models, datasets, the Lightning CLI (``python main.py``).

The model and dataset registries are ``classification.registry``; ``classification.families`` registers every
family (kept out of this file, see its docstring: segmentation's families import the registry).
"""
