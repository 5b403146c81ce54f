"""Imports inside the package point one way: api -> engine / adapters -> reft, training -> adapters /
reft, and server/reft/ imports nothing else of the package. A new arrow against that fails here."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "server"

# room -> the other rooms it may import (rooms: the subpackages, and the top-level modules)
ALLOWED = {
    "reft": set(),
    "engine": {"reft", "metrics"},
    "adapters": {"reft", "metrics"},
    "training": {"adapters", "reft", "plugins", "tokenization", "model_location", "model_load_errors"},
}
FRONT = {"api", "app", "cli"}  # what no other room imports


def room_of(module: str) -> str:
    return module.split(".")[1] if module.count(".") else module


def room_imports() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        source = room_of(".".join(part for part in relative.parts if part != "__init__"))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            for target in targets:
                if target.startswith("server.") and room_of(target) != source:
                    edges.setdefault(source, set()).add(room_of(target))
    return edges


EDGES = room_imports()


@pytest.mark.parametrize("room", sorted(ALLOWED))
def test_a_lower_room_imports_only_what_it_may(room):
    assert EDGES.get(room, set()) <= ALLOWED[room], EDGES.get(room)


def test_no_room_imports_the_server_front():
    for room, targets in EDGES.items():
        if room not in FRONT:
            assert not targets & FRONT, (room, targets)


def reachable(start: str) -> set[str]:
    """Every room that `start` imports, directly or through others."""
    seen, frontier = set(), [start]
    while frontier:
        for target in EDGES.get(frontier.pop(), ()):
            if target not in seen:
                seen.add(target)
                frontier.append(target)
    return seen


@pytest.mark.parametrize("room", sorted(EDGES))
def test_no_room_imports_itself_through_others(room):
    assert room not in reachable(room)
