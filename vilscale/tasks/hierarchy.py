"""The semantic softmax of ImageNet-21K-P (Ridnik et al., "ImageNet-21K Pretraining for the Masses", 2021).

The classes of the data form a tree (WordNet's hypernyms for ImageNet-21K): every class is a node, the parents
of some are classes too (``animal`` is a class with its own images and the parent of ``dog``). A class's
*depth* is its number of ancestors; the classes of one depth form one *level*, and training uses one softmax
per level instead of one over all classes. An image of class c is a positive, at each level up to c's depth,
for c's ancestor at that level (c itself at its own depth); levels deeper than c say nothing about it.

    loss = sum over levels l of  w_l x mean over the batch of CE_l
    w_l  = min(20, C / (classes at depth >= l))        the paper's balancing: deep levels, which few images
                                                       reach, weigh more; capped at 20 as their code does

CE_l of a sample without a positive at level l is 0 (and it still counts in the batch mean). Label smoothing
spreads epsilon over the classes of the level; mixup and cutmix mix the per-level losses of the two images with
the mix's weights (cross-entropy is linear in the target, so this is the per-level mixed target). Levels that
hold a single class have nothing to choose between and are left out, as in their code.

Targets are converted on the training device by one gather of a (classes x levels) table, never per sample in
Python (their implementation loops over the batch on the CPU). The semantic top-1 is their metric: correct
predictions over all (sample, level) pairs with a positive.

Hierarchy files (``data.hierarchy``):
- text: one ``CHILD PARENT`` pair of class names per line, ``#`` comments; a class that is nobody's child is a
  root (depth 0);
- MIIL's ``imagenet21k_miil_tree.pth`` (a plain dict of lists, read with ``torch.load(weights_only=True)``):
  ``class_description`` names the classes in their index order and ``class_tree_list[i]`` is class i followed
  by its ancestors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from vilscale.data.augment import MixedLabels

MAX_LEVEL_WEIGHT = 20.0
"""The cap of a level's weight (Alibaba-MIIL/ImageNet21K's ``max_normalization_factor``)."""


class HierarchyError(ValueError):
    """The hierarchy file cannot be used with these classes; the message names the file and the fix."""


def read_parents(path: str | os.PathLike) -> dict[str, str]:
    """{child: parent} from a hierarchy file (text pairs or MIIL's .pth tree)."""
    path = Path(path)
    if not path.is_file():
        raise HierarchyError(f"hierarchy file {path} does not exist; give a text file of CHILD PARENT lines")
    if path.suffix == ".pth":
        return _read_miil_tree(path)
    parents: dict[str, str] = {}
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise HierarchyError(f"hierarchy file {path} is not text; give CHILD PARENT lines or MIIL's .pth tree") \
            from None
    for number, line in enumerate(lines, 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) != 2:
            raise HierarchyError(f"hierarchy file {path} line {number}: {line.strip()!r} is not a CHILD PARENT pair")
        child, parent = words
        if parents.get(child, parent) != parent:
            raise HierarchyError(f"hierarchy file {path} line {number}: {child} has two parents ({parents[child]} and "
                                 f"{parent}); a class has one parent")
        parents[child] = parent
    return parents


def _read_miil_tree(path: Path) -> dict[str, str]:
    try:
        tree = torch.load(path, map_location="cpu", weights_only=True)
        names = list(tree["class_description"])
        chains = tree["class_tree_list"]
        return {names[int(chain[0])]: names[int(chain[1])] for chain in chains if len(chain) > 1}
    except Exception as error:  # noqa: BLE001 - any unreadable file is the same mistake for the user
        raise HierarchyError(f"hierarchy file {path} is not MIIL's tree (a dict with class_description and "
                             f"class_tree_list): {type(error).__name__}: {error}") from None


@dataclass(frozen=True)
class ClassHierarchy:
    """The levels of a class tree over the data's class list (class index = position in ``classes``)."""

    classes: tuple[str, ...]
    depth: tuple[int, ...]
    """Per class: its number of ancestors."""
    level_depths: tuple[int, ...]
    """The depth of each level trained (depths holding more than one class), shallowest first."""
    members: tuple[tuple[int, ...], ...]
    """Per level: the class indices it holds, ascending (the order of its softmax)."""
    weights: tuple[float, ...]
    """Per level: w_l = min(20, C / classes at depth >= the level's depth)."""
    targets: tuple[tuple[int, ...], ...]
    """Per class: per level, the position in the level's softmax of the class's ancestor there (-1: none)."""

    @classmethod
    def from_parents(cls, parents: dict[str, str], classes, *, source: str = "the hierarchy") -> ClassHierarchy:
        classes = tuple(classes)
        index = {name: i for i, name in enumerate(classes)}
        unknown = sorted({name for pair in parents.items() for name in pair} - index.keys())
        if unknown:
            shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            raise HierarchyError(f"{source} names {len(unknown)} class(es) that are not in the data's class list: "
                                 f"{shown}; every class of the tree must be a class of the shards (prepare them with "
                                 "the tree's classes, or give the tree of these classes)")
        parent = [index[parents[name]] if name in parents else -1 for name in classes]
        depth = [-1] * len(classes)
        for start in range(len(classes)):
            chain, node = [], start
            while node != -1 and depth[node] == -1:
                if node in chain:
                    cycle = " -> ".join(classes[n] for n in chain[chain.index(node):] + [node])
                    raise HierarchyError(f"{source} has a cycle: {cycle}; a class cannot be its own ancestor")
                chain.append(node)
                node = parent[node]
            base = -1 if node == -1 else depth[node]
            for offset, member in enumerate(reversed(chain), 1):
                depth[member] = base + offset
        by_depth: dict[int, list[int]] = {}
        for i, d in enumerate(depth):
            by_depth.setdefault(d, []).append(i)
        level_depths = tuple(d for d in sorted(by_depth) if len(by_depth[d]) > 1)
        if not level_depths:
            raise HierarchyError(f"{source} leaves no level with two or more classes: nothing to train")
        at_or_below = {d: sum(len(by_depth[e]) for e in by_depth if e >= d) for d in by_depth}
        weights = tuple(min(MAX_LEVEL_WEIGHT, len(classes) / at_or_below[d]) for d in level_depths)
        position = {(d, i): p for d in level_depths for p, i in enumerate(by_depth[d])}
        targets = []
        for i in range(len(classes)):
            ancestors = {}
            node = i
            while node != -1:
                ancestors[depth[node]] = node
                node = parent[node]
            targets.append(tuple(position[(d, ancestors[d])] if d in ancestors else -1 for d in level_depths))
        return cls(classes, tuple(depth), level_depths, tuple(tuple(by_depth[d]) for d in level_depths), weights,
                   tuple(targets))

    @classmethod
    def read(cls, path: str | os.PathLike, classes) -> ClassHierarchy:
        return cls.from_parents(read_parents(path), classes, source=f"hierarchy file {path}")


class SemanticSoftmax:
    """The per-level loss and metrics of a `ClassHierarchy`, with its tables on ``device``.

    Args:
        hierarchy: the class tree.
        label_smoothing: epsilon, spread over the classes of each level.
        device: where the logits and labels are (the tables are moved there once).
    """

    def __init__(self, hierarchy: ClassHierarchy, *, label_smoothing: float = 0.0, device="cpu"):
        self.hierarchy, self.label_smoothing = hierarchy, float(label_smoothing)
        self.targets = torch.tensor(hierarchy.targets, dtype=torch.int64, device=device)  # (C, L)
        self.members = [torch.tensor(m, dtype=torch.int64, device=device) for m in hierarchy.members]
        self.weights = list(hierarchy.weights)
        self.depth = torch.tensor(hierarchy.depth, dtype=torch.int64, device=device)  # (C,)

    def level_targets(self, labels: torch.Tensor) -> torch.Tensor:
        """(B,) class indices -> (B, L) position of the positive in each level's softmax, -1 where none: one gather
        on the labels' device."""
        return self.targets[labels]

    def loss(self, logits: torch.Tensor, mixed: MixedLabels) -> torch.Tensor:
        """sum_l w_l x mean over the batch of the level's (smoothed, mixed) cross-entropy."""
        logits = logits.float()
        eps, lam = self.label_smoothing, float(mixed.lam)
        sides = [(lam, self.level_targets(mixed.labels))]
        if lam < 1.0:
            sides.append((1.0 - lam, self.level_targets(mixed.partners)))
        total = logits.new_zeros(())
        for level, (members, weight) in enumerate(zip(self.members, self.weights)):
            log_probs = F.log_softmax(logits.index_select(1, members), dim=-1)  # (B, n_l)
            spread = -log_probs.mean(dim=-1)  # cross-entropy against the uniform distribution of the level
            per_sample = logits.new_zeros(logits.shape[0])
            for share, targets in sides:
                target = targets[:, level]
                nll = -log_probs.gather(1, target.clamp(min=0)[:, None])[:, 0]
                per_sample = per_sample + share * ((1.0 - eps) * nll + eps * spread) * (target >= 0)
            total = total + weight * per_sample.mean()
        return total

    def hits(self, logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None = None):
        """(correct, counted): the semantic top-1's numerator and denominator over the batch: per level, whether
        the level's argmax is the sample's positive there, over the (sample, level) pairs that have one."""
        targets = self.level_targets(labels.clamp(min=0))
        if valid is not None:
            targets = targets.masked_fill(~valid[:, None], -1)
        correct = logits.new_zeros((), dtype=torch.int64)
        counted = (targets >= 0).sum()
        for level, members in enumerate(self.members):
            predicted = logits.index_select(1, members).argmax(dim=-1)
            correct = correct + ((predicted == targets[:, level]) & (targets[:, level] >= 0)).sum()
        return correct, counted

    def within_level(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The logits with every class outside the label's own level (depth) at -inf: top-k among the label's
        siblings at its depth, what the per-level softmaxes were trained to rank."""
        depth = self.depth[labels.clamp(min=0)]  # (B,)
        return logits.masked_fill(self.depth[None, :] != depth[:, None], float("-inf"))
