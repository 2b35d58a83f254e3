"""The model and dataset registries (classification/registry.py): families register themselves, a name is registered
once, one builder signature, the one import list (classification/families.py) registers every family, and the
module-level import graph of the packages has no cycle."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import classification.families  # noqa: F401  every family registered
from classification import registry
from classification.registry import DATASETS, MODELS, create_model, get_spec, register_dataset, register_model
from classification.weights import classifier_create

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("asi_core", "classification", "segmentation")

# today's registries, in registration order (the order of the valid choices in messages)
ALL_MODELS = ["mcunet", "mobilenet_v2", "resnet18", "resnet34", "swin_t", "vit_b_32", "swin_tiny_test", "vit_tiny_test",
              "pspnet_r18", "deeplabv3_r18", "fcn_r18", "upernet_r18", "pspnet_mv2", "deeplabv3_mv2",
              "tinyllama", "llama_tiny", "hf"]
ALL_DATASETS = ["digits", "cifar10", "cifar100", "flowers102", "pets", "cub200", "imagenet", "digits_tokens", "boolq",
                "voc12aug", "cityscapes", "digit_scenes"]


# ----------------------------------------------------------------------------- registration
def test_a_name_is_registered_once():
    before_models, before_datasets = dict(MODELS), dict(DATASETS)
    with pytest.raises(ValueError, match="a model named 'mcunet' is already registered"):
        register_model("mcunet", builder=None, head="fc", weights_url="", weights_file="", resolution=32)
    with pytest.raises(ValueError, match="a dataset named 'digits' is already registered"):
        register_dataset("digits", num_classes=10, build=None, how_to_obtain="")
    assert MODELS == before_models and DATASETS == before_datasets  # nothing replaced


def test_a_model_registered_from_outside_builds_with_a_fresh_head():
    name = "tiny_sequential_test"

    def builder():
        return nn.Sequential(nn.Flatten(), nn.Linear(12, 1000))

    try:
        register_model(name, builder=builder, head="1", weights_url="", weights_file="", resolution=2)(
            classifier_create(name, builder, "1"))
        with pytest.raises(ValueError, match="already registered"):  # the decorator form refuses it too
            register_model(name, builder=builder, head="1", weights_url="", weights_file="", resolution=2)
        net = create_model(name, 7, pretrained=False)
        assert isinstance(net[1], nn.Linear) and (net[1].in_features, net[1].out_features) == (12, 7)
        assert net(torch.randn(2, 3, 2, 2)).shape == (2, 7)
        assert get_spec(name).create is not None and get_spec(name).options == ()
        with pytest.raises(ValueError, match=f"model '{name}' takes no options \\['shape_only'\\]"):
            create_model(name, 7, pretrained=False, shape_only=True)
        with pytest.raises(ValueError, match="no published weights"):
            create_model(name, 7, pretrained=True)
    finally:
        MODELS.pop(name, None)


def built_in(models) -> list[str]:
    """The registered names less those a model source built on demand (timm:..., pretrainedmodels:...), which other
    tests of this process may have looked up."""
    return [m for m in models if m.partition(":")[0] not in registry.MODEL_SOURCES]


def test_every_family_is_registered_by_the_one_import_list():
    assert built_in(MODELS) == ALL_MODELS and list(DATASETS) == ALL_DATASETS
    assert list(registry.MODEL_SOURCES) == ["timm", "pretrainedmodels"]
    llm, seg, cnn = get_spec("tinyllama"), get_spec("pspnet_r18"), get_spec("mcunet")
    # the family hooks the model core calls instead of switching on names
    assert llm.options == ("name_or_path", "shape_only", "num_blocks") and llm.shape_only_profile
    assert llm.tokenizer_source("some/dir") == "some/dir" and llm.layer_sets is None
    assert cnn.options == () and cnn.tokenizer_source is None and not cnn.shape_only_profile and cnn.layer_sets is None
    from segmentation.layer_sets import layer_set
    assert seg.layer_sets(5) == layer_set("pspnet_r18", 5) and seg.layer_sets(3) is None and seg.options == ()
    from classification.llm import is_llm
    assert [m for m in MODELS if is_llm(m)] == ["tinyllama", "llama_tiny", "hf"] and not is_llm("no_such_model")
    # dataset specs answer what data.py used to ask of names
    assert [d for d, s in DATASETS.items() if s.in_memory] == ["digits", "digits_tokens", "boolq"]
    assert [d for d, s in DATASETS.items() if s.downloadable] == ["cifar10", "cifar100", "flowers102", "pets",
                                                                  "cub200", "imagenet"]
    assert {d: s.tokens for d, s in DATASETS.items() if s.tokens is not None} == {"digits_tokens": 65}
    with pytest.raises(ValueError, match="Unknown model 'vgg'; valid choices: mcunet, mobilenet_v2"):
        get_spec("vgg")
    with pytest.raises(ValueError, match="Unknown dataset 'mnist'; valid choices: digits, cifar10"):
        registry.get_dataset_spec("mnist")


def test_names_imported_from_the_old_modules_keep_working():
    from classification import backbones, data

    assert built_in(backbones.MODELS) == ALL_MODELS and list(data.DATASETS) == ALL_DATASETS
    assert backbones.create_model is create_model and data.get_dataset_spec("digits") is DATASETS["digits"]
    # as before the registry: create is set only for the families that build and load themselves
    assert backbones.get_spec("mcunet") is get_spec("mcunet") and backbones.MODELS is MODELS
    assert backbones.MODELS["resnet18"].weights_file and not backbones.get_spec("fcn_r18").weights_file
    assert backbones.MODELS["swin_t"].weights_url == get_spec("swin_t").weights_url
    from classification.backbones import ckpt_dir, imagenet_weights_path, reset_classifier  # noqa: F401
    from classification.llm import is_llm, source_of  # noqa: F401


def test_the_registry_imports_no_family_and_no_torch():
    code = ("import sys, classification.registry as r; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'segmentation', 'asi_core') "
            "or m.startswith('classification.')), len(r.MODELS), len(r.DATASETS))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["['classification.registry']", "0", "0"]


# ----------------------------------------------------------------------------- import graph
def _top_level_imports(tree: ast.Module):
    """Import statements run when the module is imported: not inside functions, not under ``if TYPE_CHECKING``."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def import_graph(root: Path, packages=PACKAGES) -> dict[str, set[str]]:
    """Module-level import graph among the modules of ``packages`` under ``root`` (a package is its __init__).

    ``import a.b.c`` / ``from a.b import c`` run a/__init__, a/b/__init__ and a/b/c: an edge to each of them, except
    to the packages that hold the importing module (importing it has already started them)."""
    paths = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        is_pkg = path.name == "__init__.py"
        targets = []
        for node in _top_level_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets += [a.name for a in node.names]
                continue
            if node.level:
                base = name if is_pkg else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module
            targets += [module] + [f"{module}.{a.name}" for a in node.names]
        edges = set()
        for target in targets:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                dep = ".".join(parts[:i])
                if dep in paths and dep != name and not name.startswith(dep + "."):
                    edges.add(dep)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]):
    """One cycle of ``graph`` as [m0, m1, ..., m0], or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_module_level_import_graph_has_no_cycle():
    graph = import_graph(REPO)
    cycle = find_cycle(graph)
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle)
    # the graph is the real one (not vacuous) and has the layout the registry needs
    assert graph["classification.registry"] == set()
    assert {"classification", "classification.registry"} <= graph["segmentation.models"]
    assert {"classification.backbones", "classification.llm", "classification.data", "classification.text_data",
            "segmentation.models", "segmentation.data"} <= graph["classification.families"]
    assert "classification.llm" not in graph["classification.backbones"]
    assert "classification.backbones" not in graph["classification.llm"]
    assert not graph["classification"] & {m for m in graph if m.startswith("segmentation")}


def test_the_cycle_finder_sees_a_package_level_cycle(tmp_path):
    """The layout the registry avoids: a package __init__ importing a family that imports the package's registry."""
    for rel, text in {"pkg/__init__.py": "import fam.models\n", "pkg/reg.py": "",
                      "fam/__init__.py": "", "fam/models.py": "from pkg.reg import x\n\ndef f():\n    import pkg\n"}.items():
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_text(text)
    graph = import_graph(tmp_path, ("pkg", "fam"))
    assert graph["fam.models"] == {"pkg", "pkg.reg"}
    assert find_cycle(graph) == ["fam.models", "pkg", "fam.models"]
