"""The layering of utils/ and model/, read from the imports (ast), so that it cannot drift.

    utils/ root (shared helpers)  <-  model/  <-  the stages, in the order
    data -> evaluation -> training | inference

- a utils root module imports neither model/ nor a utils sub-package;
- model/ imports the utils root only, never a stage;
- a stage imports only the stages before it: evaluation reads data, training and inference read
  data and evaluation (train-time validation runs evaluation's loop, the precision guard its
  metrics), and training and inference never import each other.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGE_LEVELS = {"data": 0, "evaluation": 1, "training": 2, "inference": 2}


def imported_modules(source: str) -> set[str]:
    """Every module ``source`` imports, at any depth (``from utils import data`` counts as ``utils.data``)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            if node.module == "utils":
                found.update(f"utils.{alias.name}" for alias in node.names)
    return found


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "utils" and len(parts) > 1 and parts[1] in STAGE_LEVELS else None


def violations(importer: str, imported: set[str]) -> list[str]:
    """What ``importer`` (a dotted module name) may not import among ``imported``."""
    own_stage = stage_of(importer)
    wrong = []
    for module in sorted(imported):
        top, stage = module.split(".")[0], stage_of(module)
        if importer.startswith("utils.") and own_stage is None and (top == "model" or stage is not None):
            wrong.append(f"{importer} (a utils root helper) imports {module}")
        elif importer.startswith("model") and stage is not None:
            wrong.append(f"{importer} (model/) imports the {stage} stage: {module}")
        elif own_stage and stage and stage != own_stage and STAGE_LEVELS[stage] >= STAGE_LEVELS[own_stage]:
            wrong.append(f"{importer} (the {own_stage} stage) imports the {stage} stage, not before it: {module}")
    return wrong


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_utils_and_model_keep_their_layers():
    paths = sorted([*(ROOT / "utils").rglob("*.py"), *(ROOT / "model").rglob("*.py")])
    assert any(stage_of(module_name(path)) for path in paths)  # the stages are where this test looks
    wrong = [line for path in paths for line in violations(module_name(path), imported_modules(path.read_text()))]
    assert not wrong, "layering broken:\n" + "\n".join(wrong)


def test_each_rule_catches_its_break():
    assert violations("utils.classes", {"model.unet"})
    assert violations("utils.fileio", {"utils.data.transforms"})
    assert violations("model.unet", {"utils.training.losses"})
    assert violations("utils.data.datasets", {"utils.evaluation.metrics"})
    assert violations("utils.training.train", {"utils.inference.predictor"})
    assert violations("utils.inference.predictor", {"utils.training.losses"})
    assert not violations("utils.inference.predictor", {"utils.evaluation.metrics", "utils.data.transforms",
                                                        "model", "utils.classes"})
    assert not violations("model.unet", {"utils.checkpoint", "model.unet_parts"})
