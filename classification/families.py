"""The one import list of the model and dataset families (timm's ``models/__init__.py`` pattern): importing this
module registers every family in ``classification.registry``. A new family is one more line here.

It lives in its own module, not in ``classification/__init__.py``: the segmentation families import
``classification.registry``, which runs ``classification/__init__.py`` first, so an import list there would import
segmentation while segmentation imports it (a package-level cycle). Here the graph is a tree: this module imports
the families, each family imports the registry (and ``classification.weights``), the registry imports none.
"""
from __future__ import annotations

# models (registration order = the order of the valid choices in messages)
from . import backbones  # noqa: F401  CNNs and vision transformers
import segmentation.models  # noqa: F401,E402  the paper's Table 3 segmentation networks
from . import llm  # noqa: F401,E402  Hugging Face LLaMA-family sequence classifiers
from . import hub_models  # noqa: F401,E402  timm:<name>, pretrainedmodels:<name> (built on first lookup)

# datasets
from . import data  # noqa: F401,E402  image datasets
from . import text_data  # noqa: F401,E402  text datasets (for the LLMs)
import segmentation.data  # noqa: F401,E402  segmentation datasets

# tasks (classification.tasks registers its own: one class per sample)
import segmentation.task  # noqa: F401,E402  one class per pixel
