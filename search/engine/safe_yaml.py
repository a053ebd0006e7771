"""Reading the user's YAML (recipes, run specs): UTF-8 text, safe tags only, bounded alias expansion.

`yaml.safe_load` makes an alias a second reference to one object, so a 1 KB file of
nested aliases ("billion laughs") loads at once, yet whatever walks the result
(validation, an error message that quotes it) walks it expanded: 10^6 elements from
a few lines, 10^9 from a few more. So each document's node graph is measured as if
expanded before anything is built from it, and refused above MAX_NODES.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from search.engine.errors import UserError, short

# Nodes (scalars, lists, mappings) a document may count with every alias expanded. A long
# multi-stage recipe or run spec has a few thousand; an alias bomb has millions.
MAX_NODES = 100_000


def read_text(path: str | Path, where: str) -> str:
    """A file's text as UTF-8, or one line saying it is not."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{where}: not UTF-8 text (bad byte at offset {e.start}); save the file as UTF-8") from None


def load_all(text: str, where: str) -> list[Any]:
    """Every document of `text`, built by yaml's SafeLoader once its expanded size is known to be small."""
    try:
        loader = yaml.SafeLoader(text)  # refuses control characters here, before any parsing
    except yaml.reader.ReaderError as e:  # its own message runs over two lines
        raise UserError(
            f"{where}: character {chr(e.character)!r} at offset {e.position} is not allowed in YAML; remove it"
        ) from None
    try:
        docs = []
        while loader.check_node():
            node = loader.get_node()
            _check_expanded_size(node, where)
            docs.append(loader.construct_document(node))
        return docs
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{where}: malformed YAML{at}: {getattr(e, 'problem', None) or e}; fix the syntax") from None
    except RecursionError:
        raise UserError(f"{where}: nested too deeply to read; flatten the file") from None
    except (ValueError, TypeError, AttributeError, LookupError, ArithmeticError) as e:
        # a scalar yaml's constructors cannot build: `2001-13-45`, `!!int x`, an empty `!!int`
        raise UserError(f"{where}: a value cannot be read ({short(str(e))}); fix it or quote it as a string") from None
    finally:
        loader.dispose()


def _check_expanded_size(root: yaml.Node, where: str) -> None:
    sizes: dict[int, int | None] = {}  # id(node) -> expanded size; None while it is being measured

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            if sizes[key] is None:
                raise UserError(f"{where}: an alias refers to a node that contains it (line {node.start_mark.line + 1}); "
                                "remove the cycle")
            return sizes[key]
        sizes[key] = None
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        total = 1
        for child in children:
            total += size(child)
            if total > MAX_NODES:
                raise UserError(
                    f"{where}: the document expands to more than {MAX_NODES} elements once its aliases (*name) "
                    "are expanded; write the values out or use fewer nested aliases"
                )
        sizes[key] = total
        return total

    size(root)
