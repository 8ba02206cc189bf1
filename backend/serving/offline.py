"""A project's promoted heads for the offline commands (``tag2mask label`` / ``tag2mask eval`` with
``--model-dir DIR --project P``): the same registry, checkpoint and model version the service uses.

The registry is ``DIR/models`` (:class:`backend.storage.registry.ModelRegistry`, what ``tag2mask train
--model-dir DIR`` writes). The heads load as the service's :class:`backend.serving.heads.ProjectHeadsCache`
loads them (:func:`backend.serving.heads.load_project_heads`: the promoted version, weights only,
on the engine's backbone), and are set on the engine with ``engine.set_heads``. The model version
is the service's: ``<base>+p<P>.vN`` (:func:`backend.serving.versions.project_model_version`).

Public API::

    heads = load_offline_heads("model_dir", "7", engine.backbone)   # OfflineHeadsError: a sentence
    heads.version, heads.heads, heads.labels       # "v3", ProjectHeads, the labels the heads know
    engine.set_heads(heads.heads)
    heads.model_version(base)                      # "<base>+p7.v3"

:class:`OfflineHeadsError` (a ValueError) names what is wrong and what to run: a missing folder, a
project with no trained version, versions but none promoted, heads trained on another backbone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["OfflineHeads", "OfflineHeadsError", "load_offline_heads"]


class OfflineHeadsError(ValueError):
    """The project's heads cannot be used: the message says why and what to do."""


@dataclass
class OfflineHeads:
    project: str
    version: str          # the promoted version, "v3"
    heads: Any            # explainers.training.ProjectHeads
    model_dir: Path

    @property
    def labels(self) -> list[str]:
        """The labels the heads were trained on (classifier and seg head)."""
        return list(self.heads.labels)

    def model_version(self, base: str) -> str:
        """What the service reports for this project: `base` + ``+p<project>.<version>``."""
        from backend.serving.versions import project_model_version

        return project_model_version(base, self.project, self.version)


def load_offline_heads(model_dir: str | Path, project, backbone) -> OfflineHeads:
    """The promoted heads of `project` in ``model_dir/models``, on `backbone`.

    Raises OfflineHeadsError for a missing `model_dir`, a project id that cannot be a folder name,
    a project without versions, one with versions but none promoted, or heads that cannot be used on
    `backbone` (trained on another classifier)."""
    from backend.serving.heads import load_project_heads
    from backend.storage.registry import ModelRegistry, RegistryError, project_dirname

    model_dir = Path(model_dir)
    project = str(project).strip()
    if not model_dir.is_dir():
        raise OfflineHeadsError(f"--model-dir {model_dir}: no such folder (give the folder that "
                                f"`tag2mask train --model-dir` wrote)")
    try:
        project_dirname(project)
    except ValueError as exc:
        raise OfflineHeadsError(f"--project: {exc}") from None
    registry = ModelRegistry.in_model_dir(model_dir)
    train_hint = f"train one with `tag2mask train ... --project {project} --model-dir {model_dir}`"
    versions = registry.versions(project)
    if not versions:
        known = registry.projects() if registry.root.is_dir() else []
        also = f" (projects there: {', '.join(known)})" if known else ""
        raise OfflineHeadsError(f"project {project} has no trained model in {registry.root}{also}; {train_hint}")
    try:
        current = registry.current(project)
    except (RegistryError, ValueError) as exc:
        raise OfflineHeadsError(f"project {project}: {exc}") from None
    if not current:
        raise OfflineHeadsError(
            f"project {project} has version(s) {', '.join(versions)} in {registry.root} but none is promoted; "
            f"promote one with `tag2mask models promote {project} {versions[-1]} --model-dir {model_dir}`")
    heads = load_project_heads(registry, project, backbone, current)
    if heads is None:
        try:
            trained_on = registry.meta(project, current).get("backbone")
        except (RegistryError, ValueError, OSError):
            trained_on = None
        if trained_on and trained_on != backbone.name:
            raise OfflineHeadsError(f"project {project}'s {current} was trained on the {trained_on} backbone, "
                                    f"not {backbone.name}; give --backbone {trained_on}")
        raise OfflineHeadsError(f"project {project}'s {current} in {registry.root} cannot be loaded "
                                f"(its checkpoint is missing or damaged); {train_hint}")
    return OfflineHeads(project=project, version=current, heads=heads, model_dir=model_dir)
